package sink

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const (
	outTopic      = "out"
	outPartitions = 3
	testJob       = "job"
)

// newCluster starts an in-process single-broker kfake cluster with the
// output topic.
func newCluster(t *testing.T, opts ...kfake.Opt) *kfake.Cluster {
	t.Helper()
	opts = append([]kfake.Opt{kfake.NumBrokers(1), kfake.SeedTopics(outPartitions, outTopic)}, opts...)
	c, err := kfake.NewCluster(opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// testLogger logs to stderr when SINK_TEST_LOG is set.
func testLogger() *slog.Logger {
	if os.Getenv("SINK_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// newSink creates a Kafka sink on c; mod adjusts the config.
func newSink(t *testing.T, c *kfake.Cluster, mod func(*KafkaConfig)) *Kafka {
	t.Helper()
	cfg := KafkaConfig{
		Brokers:    c.ListenAddrs(),
		Job:        testJob,
		Logger:     testLogger(),
		ClientOpts: []kgo.Opt{kgo.DisableClientMetrics()},
	}
	if os.Getenv("SINK_TEST_KGOLOG") != "" {
		cfg.ClientOpts = append(cfg.ClientOpts, kgo.WithLogger(kgo.BasicLogger(os.Stderr, kgo.LogLevelInfo, func() string { return time.Now().Format("15:04:05.000000 KGO ") })))
	}
	if mod != nil {
		mod(&cfg)
	}
	k, err := NewKafka(testCtx(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Close)
	return k
}

func newWriter(t *testing.T, k *Kafka, task int32) Writer {
	t.Helper()
	w, err := k.NewWriter(testCtx(t), task)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Close)
	return w
}

// writeBatch writes n records keyed k0..k4 with values "<tag>-<i>".
func writeBatch(w Writer, tag string, n int) []string {
	var vals []string
	for i := range n {
		v := fmt.Sprintf("%s-%03d", tag, i)
		vals = append(vals, v)
		w.Write(&kgo.Record{Topic: outTopic, Key: fmt.Appendf(nil, "k%d", i%5), Value: []byte(v)})
	}
	return vals
}

// preCommit seals a checkpoint and waits for its committable.
func preCommit(t *testing.T, w Writer, id int64) Committable {
	t.Helper()
	pc, err := w.PreCommit(testCtx(t), id)
	if err != nil {
		t.Fatalf("pre-commit %d: %v", id, err)
	}
	c, err := pc.Wait(testCtx(t))
	if err != nil {
		t.Fatalf("wait %d: %v", id, err)
	}
	if c == nil {
		t.Fatalf("wait %d: nil committable", id)
	}
	return *c
}

var sentinelSeq atomic.Int64

// readCommitted reads topic with a separate read_committed consumer until it
// has seen a fresh sentinel record (written by a plain producer) on every
// partition, and returns the other records' values in order of partition and
// offset, with their keys. A transaction left open before the sentinels
// stalls it: the test then fails on its deadline.
func readCommitted(t *testing.T, c *kfake.Cluster, topic string, partitions int32) []*kgo.Record {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sentinel := fmt.Sprintf("sentinel-%d", sentinelSeq.Add(1))
	prod, err := kgo.NewClient(kgo.SeedBrokers(c.ListenAddrs()...), kgo.RecordPartitioner(kgo.ManualPartitioner()), kgo.DisableClientMetrics())
	if err != nil {
		t.Fatal(err)
	}
	defer prod.Close()
	for p := range partitions {
		if err := prod.ProduceSync(ctx, &kgo.Record{Topic: topic, Partition: p, Value: []byte(sentinel)}).FirstErr(); err != nil {
			t.Fatalf("sentinel: %v", err)
		}
	}
	cons, err := kgo.NewClient(kgo.SeedBrokers(c.ListenAddrs()...),
		kgo.ConsumeTopics(topic),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchMaxWait(200*time.Millisecond),
		kgo.DisableClientMetrics(),
	)
	if err != nil {
		t.Fatal(err)
	}
	defer cons.Close()
	seen := map[int32]bool{}
	var recs []*kgo.Record
	for len(seen) < int(partitions) {
		fs := cons.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("read_committed consumer stuck: saw sentinels of %d of %d partitions (%d records)", len(seen), partitions, len(recs))
		}
		fs.EachRecord(func(r *kgo.Record) {
			switch v := string(r.Value); {
			case v == sentinel:
				seen[r.Partition] = true
			case strings.HasPrefix(v, "sentinel-"):
			default:
				recs = append(recs, r)
			}
		})
	}
	return recs
}

func values(recs []*kgo.Record) map[string]int {
	m := map[string]int{}
	for _, r := range recs {
		m[string(r.Value)]++
	}
	return m
}

// expectExactly checks that recs hold every value of want exactly once and
// nothing else, and that values of one key are in write order.
func expectExactly(t *testing.T, recs []*kgo.Record, want ...[]string) {
	t.Helper()
	got := values(recs)
	n := 0
	for _, vs := range want {
		for _, v := range vs {
			n++
			if got[v] != 1 {
				t.Errorf("value %s seen %d times, want once", v, got[v])
			}
		}
	}
	if len(recs) != n {
		t.Errorf("read %d records, want %d", len(recs), n)
	}
	order := map[string]string{} // key -> last value
	for _, r := range recs {
		k := string(r.Key)
		if last, ok := order[k]; ok && last > string(r.Value) {
			t.Errorf("key %s: %s after %s", k, r.Value, last)
		}
		order[k] = string(r.Value)
	}
}

// expectNone checks that none of vs is in recs.
func expectNone(t *testing.T, recs []*kgo.Record, vs []string) {
	t.Helper()
	got := values(recs)
	for _, v := range vs {
		if got[v] != 0 {
			t.Errorf("value %s of a lost transaction is visible %d times", v, got[v])
		}
	}
}

// ongoing lists this job's transactional ids with an Ongoing transaction.
func ongoing(t *testing.T, c *kfake.Cluster) []string {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(c.ListenAddrs()...), kgo.DisableClientMetrics())
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	list, err := kadm.NewClient(cl).ListTransactions(testCtx(t), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, lt := range list.Sorted() {
		if lt.State == "Ongoing" && strings.HasPrefix(lt.TxnID, DefaultTransactionalIDPrefix+"-"+testJob+"-") {
			ids = append(ids, lt.TxnID)
		}
	}
	return ids
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func containsID(ids []string, id string) bool {
	for _, x := range ids {
		if x == id {
			return true
		}
	}
	return false
}
