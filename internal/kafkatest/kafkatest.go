// Package kafkatest holds what Sluice's end-to-end tests share: an in-process
// Kafka (kfake), keyed input whose true counts are known, and an
// independent read_committed reader that reads a topic to its end and checks
// that every input's output is there exactly once.
package kafkatest

import (
	"bytes"
	"context"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
)

// SentinelKey marks the records ReadCommitted writes to find the end of a
// partition; checks ignore them.
const SentinelKey = "__sluice_sentinel"

// Start starts an in-process kfake cluster of one broker, closed with the
// test, and returns its address.
func Start(t testing.TB, opts ...kfake.Opt) (string, *kfake.Cluster) {
	t.Helper()
	c, err := kfake.NewCluster(append([]kfake.Opt{kfake.NumBrokers(1)}, opts...)...)
	if err != nil {
		t.Fatalf("start kfake: %v", err)
	}
	t.Cleanup(c.Close)
	return c.ListenAddrs()[0], c
}

// Client returns a plain client of addr, closed with the test.
func Client(t testing.TB, addr string, opts ...kgo.Opt) *kgo.Client {
	t.Helper()
	cl, err := kgo.NewClient(append([]kgo.Opt{kgo.SeedBrokers(addr)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return cl
}

// CreateTopics creates topics with the given partition count.
func CreateTopics(t testing.TB, addr string, partitions int32, topics ...string) {
	t.Helper()
	adm := kadm.NewClient(Client(t, addr))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resps, err := adm.CreateTopics(ctx, partitions, 1, nil, topics...)
	if err == nil {
		err = resps.Error()
	}
	if err != nil {
		t.Fatalf("create topics %v: %v", topics, err)
	}
}

// Key is the record key of input record i of partition p: five keys per
// partition, each only in its own partition, as Kafka's key partitioning
// would place them.
func Key(p int32, i int) string { return fmt.Sprintf("user-%d-%d", p, i%5) }

// ProduceKeyed writes perPartition records with keys Key(p, i) to every
// partition of topic and returns how many records each key got.
func ProduceKeyed(t testing.TB, addr, topic string, partitions int32, perPartition int) map[string]int64 {
	t.Helper()
	want := map[string]int64{}
	cl := Client(t, addr, kgo.RecordPartitioner(kgo.ManualPartitioner()), kgo.DefaultProduceTopic(topic))
	var recs []*kgo.Record
	for p := range partitions {
		for i := range perPartition {
			k := Key(p, i)
			want[k]++
			recs = append(recs, &kgo.Record{Partition: p, Key: []byte(k), Value: []byte(strconv.Itoa(i))})
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := cl.ProduceSync(ctx, recs...).FirstErr(); err != nil {
		t.Fatalf("produce input: %v", err)
	}
	return want
}

// ReadCommitted reads every record of topic that a read_committed consumer
// sees, to the end: it first appends a sentinel record to each partition and
// reads until every sentinel arrived, so nothing committed before is missed.
// A transaction left open before a sentinel makes it time out, which is a
// failure too (a lingering transaction blocks readers).
func ReadCommitted(t testing.TB, addr, topic string, partitions int32, timeout time.Duration) []*kgo.Record {
	t.Helper()
	prod := Client(t, addr, kgo.RecordPartitioner(kgo.ManualPartitioner()), kgo.DefaultProduceTopic(topic))
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	// Sentinels of earlier reads stay in the topic: only this read's own
	// (told apart by their value) mark the end.
	nonce := []byte(strconv.FormatInt(time.Now().UnixNano(), 36))
	for p := range partitions {
		if err := prod.ProduceSync(ctx, &kgo.Record{Partition: p, Key: []byte(SentinelKey), Value: nonce}).FirstErr(); err != nil {
			t.Fatalf("write sentinel to %s/%d: %v", topic, p, err)
		}
	}
	cons := Client(t, addr, kgo.ConsumeTopics(topic), kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	var out []*kgo.Record
	ended := map[int32]bool{}
	for len(ended) < int(partitions) {
		fs := cons.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("read_committed reader of %s reached the end of only %d of %d partitions within %s (a transaction left open?)", topic, len(ended), partitions, timeout)
		}
		fs.EachRecord(func(r *kgo.Record) {
			if string(r.Key) == SentinelKey {
				if bytes.Equal(r.Value, nonce) {
					ended[r.Partition] = true
				}
				return
			}
			if !ended[r.Partition] {
				out = append(out, r)
			}
		})
	}
	return out
}

// CheckCounts asserts that out, the output of a running count per key,
// holds per key exactly the counts 1..want[key] in order: each input's output
// exactly once, nothing lost, nothing doubled.
func CheckCounts(t testing.TB, out []*kgo.Record, want map[string]int64) {
	t.Helper()
	next := map[string]int64{}
	for _, r := range out {
		n, err := strconv.ParseInt(string(r.Value), 10, 64)
		if err != nil {
			t.Fatalf("output %q=%q is not a count", r.Key, r.Value)
		}
		k := string(r.Key)
		if n != next[k]+1 {
			t.Fatalf("key %s: output count %d follows %d (%s)", k, n, next[k], map[bool]string{true: "duplicate", false: "gap: output lost"}[n <= next[k]])
		}
		next[k] = n
	}
	for k, n := range want {
		if next[k] != n {
			t.Fatalf("key %s: last output count %d, want %d (output lost)", k, next[k], n)
		}
	}
	if len(next) != len(want) {
		t.Fatalf("output has %d keys, want %d", len(next), len(want))
	}
}
