package sluicetest

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
)

// Client returns a Kafka client of the env's broker from the host, with
// opts added; it is closed when the test ends.
func (e *Env) Client(t testing.TB, opts ...kgo.Opt) *kgo.Client {
	t.Helper()
	cl, err := kgo.NewClient(append([]kgo.Opt{kgo.SeedBrokers(e.Broker.Addr)}, opts...)...)
	if err != nil {
		t.Fatalf("sluicetest: kafka client: %v", err)
	}
	t.Cleanup(cl.Close)
	return cl
}

// CreateTopics creates topics with the given number of partitions
// (replication factor 1).
func (e *Env) CreateTopics(t testing.TB, partitions int32, topics ...string) {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(e.Broker.Addr))
	if err != nil {
		t.Fatalf("sluicetest: kafka client: %v", err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	resps, err := kadm.NewClient(cl).CreateTopics(ctx, partitions, 1, nil, topics...)
	if err == nil {
		err = resps.Error()
	}
	if err != nil {
		t.Fatalf("sluicetest: create topics %v: %v", topics, err)
	}
}

// Produce writes records to topic (those with an empty Topic) and waits
// until the broker acknowledged all of them. Records are partitioned by key
// as Kafka's Java client does, unless opts say otherwise (e.g.
// kgo.RecordPartitioner(kgo.ManualPartitioner()) to use Record.Partition).
func (e *Env) Produce(t testing.TB, topic string, records []*kgo.Record, opts ...kgo.Opt) {
	t.Helper()
	cl, err := kgo.NewClient(append([]kgo.Opt{kgo.SeedBrokers(e.Broker.Addr), kgo.DefaultProduceTopic(topic)}, opts...)...)
	if err != nil {
		t.Fatalf("sluicetest: kafka client: %v", err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := cl.ProduceSync(ctx, records...).FirstErr(); err != nil {
		t.Fatalf("sluicetest: produce %d records to %s: %v", len(records), topic, err)
	}
}

// ReadCommitted reads every record of topic that a read_committed consumer
// sees, from the start to the end of every partition. It first waits until
// no transaction is open on the topic (each partition's last stable offset
// equals its high watermark), so nothing decided later is missed; a
// transaction that stays open past timeout fails the test, naming the
// partitions it blocks. Unlike a reader that appends sentinel records to
// find the end, it leaves the topic as it is.
func (e *Env) ReadCommitted(t testing.TB, topic string, timeout time.Duration) []*kgo.Record {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	recs, err := readCommitted(ctx, e.Broker.Addr, topic)
	if err != nil {
		t.Fatalf("sluicetest: read_committed %s: %v", topic, err)
	}
	return recs
}

// readCommitted implements ReadCommitted.
func readCommitted(ctx context.Context, addr, topic string) ([]*kgo.Record, error) {
	adm, err := kgo.NewClient(kgo.SeedBrokers(addr))
	if err != nil {
		return nil, err
	}
	defer adm.Close()
	ends, err := stableEnds(ctx, kadm.NewClient(adm), topic)
	if err != nil {
		return nil, err
	}
	cons, err := kgo.NewClient(kgo.SeedBrokers(addr), kgo.ConsumeTopics(topic),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		// Control records tell that a partition's last offset was reached
		// when it ends with a transaction marker.
		kgo.KeepControlRecords())
	if err != nil {
		return nil, err
	}
	defer cons.Close()
	left := map[int32]int64{}
	for p, end := range ends {
		if end > 0 {
			left[p] = end
		}
	}
	var out []*kgo.Record
	var lastErr error // the client retries; reported only if the end is not reached
	for len(left) > 0 {
		fs := cons.PollFetches(ctx)
		if ctx.Err() != nil {
			return nil, fmt.Errorf("the end of %d partitions (partition: end offset) %v not reached (last fetch error: %v): %w", len(left), left, lastErr, ctx.Err())
		}
		for _, fe := range fs.Errors() {
			lastErr = fmt.Errorf("fetch %s/%d: %w", fe.Topic, fe.Partition, fe.Err)
		}
		fs.EachRecord(func(r *kgo.Record) {
			end, ok := left[r.Partition]
			if !ok || r.Offset >= end {
				return // past the end this read is about
			}
			if !r.Attrs.IsControl() {
				out = append(out, r)
			}
			if r.Offset+1 >= end {
				delete(left, r.Partition)
			}
		})
	}
	return out, nil
}

// stableEnds waits until every partition of topic has no open transaction
// (last stable offset = high watermark) and returns those ends.
func stableEnds(ctx context.Context, adm *kadm.Client, topic string) (map[int32]int64, error) {
	var blocked []string
	for {
		hwm, err := adm.ListEndOffsets(ctx, topic)
		if err == nil {
			err = hwm.Error()
		}
		var lso kadm.ListedOffsets
		if err == nil {
			lso, err = adm.ListCommittedOffsets(ctx, topic)
		}
		if err == nil {
			err = lso.Error()
		}
		if err == nil {
			ends := map[int32]int64{}
			blocked = blocked[:0]
			hwm.Each(func(o kadm.ListedOffset) {
				ends[o.Partition] = o.Offset
				if l, ok := lso.Lookup(topic, o.Partition); !ok || l.Offset != o.Offset {
					blocked = append(blocked, fmt.Sprintf("%d (last stable offset %d, high watermark %d)", o.Partition, l.Offset, o.Offset))
				}
			})
			if len(ends) == 0 {
				err = fmt.Errorf("topic %s has no partitions", topic)
			} else if len(blocked) == 0 {
				return ends, nil
			}
		}
		select {
		case <-ctx.Done():
			if err != nil {
				return nil, err
			}
			slices.Sort(blocked)
			return nil, fmt.Errorf("transactions stay open on partitions %s", strings.Join(blocked, ", "))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Tail is a read_committed consumer of a topic running in the background
// from the topic's start, so a test can watch the committed output grow.
type Tail struct {
	cl     *kgo.Client
	cancel context.CancelFunc
	done   chan struct{}

	mu   sync.Mutex
	recs []*kgo.Record
}

// Tail starts reading topic read_committed from its start until the test
// ends.
func (e *Env) Tail(t testing.TB, topic string) *Tail {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(e.Broker.Addr), kgo.ConsumeTopics(topic),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatalf("sluicetest: tail %s: %v", topic, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	tl := &Tail{cl: cl, cancel: cancel, done: make(chan struct{})}
	go tl.run(ctx)
	t.Cleanup(tl.Close)
	return tl
}

func (tl *Tail) run(ctx context.Context) {
	defer close(tl.done)
	for ctx.Err() == nil {
		fs := tl.cl.PollFetches(ctx)
		tl.mu.Lock()
		fs.EachRecord(func(r *kgo.Record) { tl.recs = append(tl.recs, r) })
		tl.mu.Unlock()
	}
}

// Len returns how many records were read so far.
func (tl *Tail) Len() int {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	return len(tl.recs)
}

// Records returns the records read so far, in the order read.
func (tl *Tail) Records() []*kgo.Record {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	return slices.Clone(tl.recs)
}

// WaitLen waits until at least n records were read; past timeout it fails
// the test.
func (tl *Tail) WaitLen(t testing.TB, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for tl.Len() < n {
		if time.Now().After(deadline) {
			t.Fatalf("sluicetest: only %d of %d records visible to read_committed after %s", tl.Len(), n, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Close stops the reader.
func (tl *Tail) Close() {
	tl.cancel()
	<-tl.done
	tl.cl.Close()
}

// WaitCommitted waits until at least n records of topic are visible to a
// read_committed reader and returns them; past timeout it fails the test.
func (e *Env) WaitCommitted(t testing.TB, topic string, n int, timeout time.Duration) []*kgo.Record {
	t.Helper()
	tl := e.Tail(t, topic)
	defer tl.Close()
	tl.WaitLen(t, n, timeout)
	return tl.Records()
}
