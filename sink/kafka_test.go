package sink

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

func TestHappyPath(t *testing.T) {
	c := newCluster(t)
	inits := countKey(c, kmsg.InitProducerID)
	k := newSink(t, c, nil)
	w := newWriter(t, k, 1)
	// kgo loads producer ids lazily; NewWriter must have fenced every
	// slot itself.
	if n := inits.Load(); n != 3 {
		t.Errorf("NewWriter sent %d InitProducerID, want 3 (one per pool slot)", n)
	}

	var all [][]string
	var cs []Committable
	all = append(all, writeBatch(w, "c1", 50))
	cs = append(cs, preCommit(t, w, 1))
	all = append(all, writeBatch(w, "c2", 50))
	cs = append(cs, preCommit(t, w, 2)) // two pending: pool of 3
	all = append(all, writeBatch(w, "c3", 50))
	if _, err := w.PreCommit(testCtx(t), 3); err == nil || !strings.Contains(err.Error(), "pool of 3 transactional ids exhausted: checkpoint 1 still pending") {
		t.Fatalf("third pending checkpoint: got %v, want pool exhausted", err)
	}
	if err := w.Commit(testCtx(t), cs); err != nil {
		t.Fatal(err)
	}
	// The failed barrier changed nothing: c3's records go with checkpoint 3.
	cs = append(cs, preCommit(t, w, 3))
	if err := w.Commit(testCtx(t), cs); err != nil { // 1 and 2 again: skipped
		t.Fatal(err)
	}
	all = append(all, writeBatch(w, "c4", 10))
	c4 := preCommit(t, w, 4)
	cs = append(cs, c4)
	if err := w.Commit(testCtx(t), cs[3:]); err != nil {
		t.Fatal(err)
	}

	for i, cm := range cs {
		if want := k.TransactionalID(1, i%3); cm.TransactionalID != want {
			t.Errorf("checkpoint %d on %s, want %s", cm.CheckpointID, cm.TransactionalID, want)
		}
		if cm.Marker.Topic != testJob+"-progress" || cm.Marker.Partition != 1 {
			t.Errorf("checkpoint %d marker %v, want %s-progress partition 1", cm.CheckpointID, cm.Marker, testJob)
		}
	}
	// Slot 0 served checkpoints 1 and 4: with transaction protocol v2 the
	// epoch moved on between them.
	if cs[3].ProducerID != cs[0].ProducerID || cs[3].Epoch <= cs[0].Epoch {
		t.Errorf("slot 0: checkpoint 1 at %d/%d, checkpoint 4 at %d/%d: want the same producer, a later epoch",
			cs[0].ProducerID, cs[0].Epoch, cs[3].ProducerID, cs[3].Epoch)
	}
	expectExactly(t, readCommitted(t, c, outTopic, outPartitions), all...)
	if st := w.(StatsReporter).Stats(); st.RecordsWritten != 160 || st.TransactionsCommitted != 4 || st.ProduceErrors != 0 {
		t.Errorf("stats %+v", st)
	}
	// The markers are committed and readable.
	for _, cm := range cs {
		out, err := k.resolveMarker(testCtx(t), cm.Marker, 1, cm.CheckpointID)
		if err != nil || out != Committed {
			t.Errorf("marker of %d: %v %v", cm.CheckpointID, out, err)
		}
	}
}

// countKey counts the requests of key the cluster receives.
func countKey(c *kfake.Cluster, key kmsg.Key) *atomic.Int64 {
	var n atomic.Int64
	c.ControlKey(int16(key), func(kmsg.Request) (kmsg.Response, error, bool) {
		n.Add(1)
		return nil, nil, false
	})
	return &n
}

func TestRecoverAfterCrash(t *testing.T) {
	c := newCluster(t)
	a := newSink(t, c, nil)
	w := newWriter(t, a, 2)
	v1 := writeBatch(w, "c1", 30)
	c1 := preCommit(t, w, 1)
	v2 := writeBatch(w, "c2", 30)
	c2 := preCommit(t, w, 2)
	w.Close() // a crash: the transactions stay open
	if ids := ongoing(t, c); len(ids) != 2 {
		t.Fatalf("after close, open transactions %v, want 2", ids)
	}
	a.Close()

	b := newSink(t, c, nil)
	for round := range 2 { // Recover is idempotent
		outs, err := b.Recover(testCtx(t), 2, []Committable{c1, c2})
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if len(outs) != 2 || outs[0] != Committed || outs[1] != Committed {
			t.Fatalf("round %d: outcomes %v, want [committed committed]", round, outs)
		}
		expectExactly(t, readCommitted(t, c, outTopic, outPartitions), v1, v2)
	}
	// The takeover goes on: the new writer works on the same ids.
	w2 := newWriter(t, b, 2)
	v3 := writeBatch(w2, "c3", 10)
	if err := w2.Commit(testCtx(t), []Committable{preCommit(t, w2, 3)}); err != nil {
		t.Fatal(err)
	}
	expectExactly(t, readCommitted(t, c, outTopic, outPartitions), v1, v2, v3)
}

func TestLostAfterFencing(t *testing.T) {
	c := newCluster(t)
	a := newSink(t, c, nil)
	w := newWriter(t, a, 0)
	v1 := writeBatch(w, "c1", 20)
	c1 := preCommit(t, w, 1)
	w.Close()

	b := newSink(t, c, nil)
	newWriter(t, b, 0) // fences: aborts the open transaction
	outs, err := b.Recover(testCtx(t), 0, []Committable{c1})
	if err != nil {
		t.Fatal(err)
	}
	if len(outs) != 1 || outs[0] != Lost {
		t.Fatalf("outcomes %v, want [lost]", outs)
	}
	recs := readCommitted(t, c, outTopic, outPartitions)
	expectNone(t, recs, v1)
	if len(recs) != 0 {
		t.Errorf("read %d records, want none", len(recs))
	}
}

func TestLostByTransactionTimeout(t *testing.T) {
	c := newCluster(t, kfake.BrokerConfigs(map[string]string{"transaction.max.timeout.ms": "2000"}))
	k := newSink(t, c, func(cfg *KafkaConfig) { cfg.TransactionTimeout = 500 * time.Millisecond })
	if got := k.BrokerTransactionMaxTimeout(); got != 2*time.Second {
		t.Errorf("BrokerTransactionMaxTimeout %v, want 2s", got)
	}
	w := newWriter(t, k, 0)
	v1 := writeBatch(w, "c1", 20)
	c1 := preCommit(t, w, 1)
	waitFor(t, 10*time.Second, "the broker to abort the transaction on its timeout", func() bool {
		return !containsID(ongoing(t, c), c1.TransactionalID)
	})

	// The owner's commit finds it lost...
	err := w.Commit(testCtx(t), []Committable{c1})
	if !errors.Is(err, ErrTransactionLost) {
		t.Fatalf("commit after timeout: %v, want ErrTransactionLost", err)
	}
	if _, err := w.PreCommit(testCtx(t), 2); err == nil {
		t.Error("pre-commit after a lost transaction succeeded")
	}
	// ...and so does a recovery by another process.
	b := newSink(t, c, func(cfg *KafkaConfig) { cfg.TransactionTimeout = 500 * time.Millisecond })
	outs, err := b.Recover(testCtx(t), 0, []Committable{c1})
	if err != nil || len(outs) != 1 || outs[0] != Lost {
		t.Fatalf("recover: %v %v, want [lost]", outs, err)
	}
	expectNone(t, readCommitted(t, c, outTopic, outPartitions), v1)
}

func TestRecoverPrefixRule(t *testing.T) {
	c := newCluster(t)
	a := newSink(t, c, func(cfg *KafkaConfig) { cfg.PoolSize = 4 })
	w := newWriter(t, a, 3)
	v1 := writeBatch(w, "c1", 20)
	c1 := preCommit(t, w, 1)
	v2 := writeBatch(w, "c2", 20)
	c2 := preCommit(t, w, 2)
	v3 := writeBatch(w, "c3", 20)
	c3 := preCommit(t, w, 3)
	w.Close()
	// The broker loses the second transaction only.
	if err := a.abortTransactionalID(testCtx(t), c2.TransactionalID); err != nil {
		t.Fatal(err)
	}

	b := newSink(t, c, func(cfg *KafkaConfig) { cfg.PoolSize = 4 })
	outs, err := b.Recover(testCtx(t), 3, []Committable{c1, c2, c3})
	if err != nil {
		t.Fatal(err)
	}
	if want := []Outcome{Committed, Lost, Lost}; len(outs) != 3 || outs[0] != want[0] || outs[1] != want[1] || outs[2] != want[2] {
		t.Fatalf("outcomes %v, want %v", outs, want)
	}
	// The third was not committed; the takeover's fencing aborts it.
	if !containsID(ongoing(t, c), c3.TransactionalID) {
		t.Fatalf("checkpoint 3's transaction is not open any more: Recover must leave it alone")
	}
	newWriter(t, b, 3)
	recs := readCommitted(t, c, outTopic, outPartitions)
	expectExactly(t, recs, v1)
	expectNone(t, recs, v2)
	expectNone(t, recs, v3)
	if out, err := b.resolveMarker(testCtx(t), c3.Marker, 3, 3); err != nil || out != Lost {
		t.Errorf("marker of checkpoint 3: %v %v, want lost", out, err)
	}
}

func TestZombieCannotCommit(t *testing.T) {
	c := newCluster(t)
	a := newSink(t, c, nil)
	zombie := newWriter(t, a, 0)
	v1 := writeBatch(zombie, "c1", 20)
	c1 := preCommit(t, zombie, 1)

	b := newSink(t, c, nil)
	owner := newWriter(t, b, 0) // the new owner fences the pool

	err := zombie.Commit(testCtx(t), []Committable{c1})
	if !errors.Is(err, ErrFenced) && !errors.Is(err, ErrTransactionLost) {
		t.Fatalf("zombie commit: %v, want ErrFenced or ErrTransactionLost", err)
	}
	// The zombie's open transaction was aborted too: its next barrier fails.
	writeBatch(zombie, "z2", 5)
	if pc, err := zombie.PreCommit(testCtx(t), 2); err == nil {
		if _, err := pc.Wait(testCtx(t)); err == nil {
			t.Error("zombie pre-commit and wait succeeded")
		}
	}
	v2 := writeBatch(owner, "c2", 10)
	if err := owner.Commit(testCtx(t), []Committable{preCommit(t, owner, 2)}); err != nil {
		t.Fatal(err)
	}
	recs := readCommitted(t, c, outTopic, outPartitions)
	expectNone(t, recs, v1)
	expectExactly(t, recs, v2)
}

// A writer whose open transaction was fenced learns it at its next barrier.
func TestFencedWriterWait(t *testing.T) {
	c := newCluster(t)
	a := newSink(t, c, nil)
	zombie := newWriter(t, a, 0)
	v1 := writeBatch(zombie, "c1", 5)
	waitFor(t, 5*time.Second, "the transaction to start at the broker", func() bool {
		return containsID(ongoing(t, c), a.TransactionalID(0, 0))
	})
	b := newSink(t, c, nil)
	newWriter(t, b, 0)
	v2 := writeBatch(zombie, "c1b", 5)
	pc, err := zombie.PreCommit(testCtx(t), 1)
	if err == nil {
		_, err = pc.Wait(testCtx(t))
	}
	if err == nil {
		t.Fatal("a fenced writer's barrier succeeded")
	}
	if !errors.Is(err, ErrFenced) {
		t.Errorf("fenced barrier: %v, want ErrFenced", err)
	}
	recs := readCommitted(t, c, outTopic, outPartitions)
	expectNone(t, recs, v1)
	expectNone(t, recs, v2)
}

func TestLingeringTransactionsOutsidePool(t *testing.T) {
	c := newCluster(t)
	a := newSink(t, c, func(cfg *KafkaConfig) { cfg.PoolSize = 5 })
	w := newWriter(t, a, 4)
	var vs [][]string
	var cs []Committable
	for i := range int64(3) {
		vs = append(vs, writeBatch(w, "c"+string(rune('1'+i)), 10))
		cs = append(cs, preCommit(t, w, i+1))
	}
	if err := w.Commit(testCtx(t), cs); err != nil {
		t.Fatal(err)
	}
	writeBatch(w, "c4", 10)
	preCommit(t, w, 4) // slot 3, pending
	writeBatch(w, "c5", 10)
	waitFor(t, 5*time.Second, "slot 4's transaction to start at the broker", func() bool {
		return containsID(ongoing(t, c), a.TransactionalID(4, 4))
	})
	w.Close()
	if ids := ongoing(t, c); len(ids) != 2 || ids[0] != a.TransactionalID(4, 3) || ids[1] != a.TransactionalID(4, 4) {
		t.Fatalf("open transactions %v, want slots 3 and 4", ids)
	}

	b := newSink(t, c, func(cfg *KafkaConfig) { cfg.PoolSize = 3 })
	newWriter(t, b, 4)
	if ids := ongoing(t, c); len(ids) != 0 {
		t.Fatalf("open transactions after NewWriter with a smaller pool: %v", ids)
	}
	expectExactly(t, readCommitted(t, c, outTopic, outPartitions), vs...)
}

func TestAbortOrphans(t *testing.T) {
	c := newCluster(t)
	k := newSink(t, c, nil)
	for _, task := range []int32{1, 5} {
		w := newWriter(t, k, task)
		writeBatch(w, "o", 3)
		preCommit(t, w, 1)
		w.Close()
	}
	if err := k.AbortOrphans(testCtx(t), 3); err != nil {
		t.Fatal(err)
	}
	ids := ongoing(t, c)
	if len(ids) != 1 || ids[0] != k.TransactionalID(1, 0) {
		t.Fatalf("open transactions %v, want only task 1's", ids)
	}
	if err := k.AbortOrphans(testCtx(t), 3); err != nil { // nothing left: harmless
		t.Fatal(err)
	}
}

func TestConfigTimeoutAboveBrokerMax(t *testing.T) {
	c := newCluster(t, kfake.BrokerConfigs(map[string]string{"transaction.max.timeout.ms": "60000"}))
	_, err := NewKafka(testCtx(t), KafkaConfig{Brokers: c.ListenAddrs(), Job: testJob, Logger: testLogger()})
	if err == nil {
		t.Fatal("NewKafka accepted a transaction timeout above the broker's maximum")
	}
	for _, want := range []string{"15m0s", "900000 ms", "transaction.max.timeout.ms", "1m0s", "60000 ms"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

func TestConfigValidation(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  KafkaConfig
		want string
	}{
		{"no brokers", KafkaConfig{Job: "j"}, "no brokers"},
		{"no job", KafkaConfig{Brokers: []string{"x:1"}}, "job name is empty"},
		{"pool", KafkaConfig{Brokers: []string{"x:1"}, Job: "j", PoolSize: 1}, "pool size 1"},
		{"timeout", KafkaConfig{Brokers: []string{"x:1"}, Job: "j", TransactionTimeout: -time.Second}, "transaction timeout"},
		{"topic", KafkaConfig{Brokers: []string{"x:1"}, Job: "j", ProgressTopic: "a/b"}, "not a legal Kafka topic"},
		{"delivery", KafkaConfig{Brokers: []string{"x:1"}, Job: "j", Delivery: 7}, "invalid delivery"},
	} {
		_, err := NewKafka(context.Background(), tc.cfg)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
}

func TestResolveMarker(t *testing.T) {
	c := newCluster(t)
	k := newSink(t, c, nil)
	w := newWriter(t, k, 0)
	writeBatch(w, "c1", 5)
	c1 := preCommit(t, w, 1)

	// Open: the read waits at the last stable offset and says so.
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	_, err := k.resolveMarker(ctx, c1.Marker, 0, 1)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("open transaction: %v, want a deadline error", err)
	}
	// The wrong checkpoint at the marker's offset is an error, not a guess.
	w.Close()
	b := newSink(t, c, nil)
	w2 := newWriter(t, b, 0) // aborts checkpoint 1: its marker is the partition's last record
	end := endOffset(t, c, c1.Marker)
	if end != c1.Marker.Offset+2 {
		t.Fatalf("progress partition ends at %d, want marker %d + abort control record", end, c1.Marker.Offset)
	}
	if out, err := b.resolveMarker(testCtx(t), c1.Marker, 0, 1); err != nil || out != Lost {
		t.Fatalf("aborted last marker: %v %v, want lost", out, err)
	}

	// A committed marker that is the partition's last data record.
	writeBatch(w2, "c2", 5)
	c2 := preCommit(t, w2, 2)
	if err := w2.Commit(testCtx(t), []Committable{c2}); err != nil {
		t.Fatal(err)
	}
	if out, err := b.resolveMarker(testCtx(t), c2.Marker, 0, 2); err != nil || out != Committed {
		t.Fatalf("committed last marker: %v %v, want committed", out, err)
	}
	if _, err := b.resolveMarker(testCtx(t), c2.Marker, 0, 7); err == nil {
		t.Fatal("a marker of another checkpoint resolved")
	}
	// A marker below the log start is an error, never "lost".
	if err := c.DeleteRecords(c2.Marker.Topic, c2.Marker.Partition, c2.Marker.Offset+1); err != nil {
		t.Fatal(err)
	}
	if out, err := b.resolveMarker(testCtx(t), c2.Marker, 0, 2); err == nil {
		t.Fatalf("deleted marker resolved as %v", out)
	}
}

// A marker is decided by its own transaction's end marker, not by the last
// stable offset: another task's open transaction earlier in the same
// progress partition does not delay it.
func TestResolveMarkerPastOtherOpenTransaction(t *testing.T) {
	c := newCluster(t)
	k := newSink(t, c, nil)
	other := newWriter(t, k, 8) // 8 % 8 == 0: same progress partition as task 0
	writeBatch(other, "o1", 3)
	o1 := preCommit(t, other, 1) // left open
	w := newWriter(t, k, 0)
	v1 := writeBatch(w, "c1", 3)
	c1 := preCommit(t, w, 1)
	if c1.Marker.Partition != o1.Marker.Partition || c1.Marker.Offset <= o1.Marker.Offset {
		t.Fatalf("markers %v and %v: want the same partition, task 0's later", o1.Marker, c1.Marker)
	}
	if err := w.Commit(testCtx(t), []Committable{c1}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if out, err := k.resolveMarker(ctx, c1.Marker, 0, 1); err != nil || out != Committed {
		t.Fatalf("committed marker behind an open transaction: %v %v", out, err)
	}
	// And a recovery of it by another process is not held up either.
	b := newSink(t, c, nil)
	if outs, err := b.Recover(ctx, 0, []Committable{c1}); err != nil || len(outs) != 1 || outs[0] != Committed {
		t.Fatalf("recover: %v %v", outs, err)
	}
	_ = v1
}

func endOffset(t *testing.T, c *kfake.Cluster, ref MarkerRef) int64 {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(c.ListenAddrs()...), kgo.DisableClientMetrics())
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	req := kmsg.NewPtrListOffsetsRequest()
	rt := kmsg.NewListOffsetsRequestTopic()
	rt.Topic = ref.Topic
	rp := kmsg.NewListOffsetsRequestTopicPartition()
	rp.Partition = ref.Partition
	rp.Timestamp = -1
	rt.Partitions = append(rt.Partitions, rp)
	req.Topics = append(req.Topics, rt)
	resp, err := req.RequestWith(testCtx(t), cl)
	if err != nil {
		t.Fatal(err)
	}
	p := resp.Topics[0].Partitions[0]
	if err := kerr.ErrorForCode(p.ErrorCode); err != nil {
		t.Fatal(err)
	}
	return p.Offset
}

// An EndTxn answer that says nothing certain (UNKNOWN_SERVER_ERROR, the
// broker did nothing) is resolved: the transaction is resumed and committed,
// and the slot is usable again.
func TestAmbiguousCommitAnswer(t *testing.T) {
	c := newCluster(t)
	k := newSink(t, c, nil)
	w := newWriter(t, k, 0)
	v1 := writeBatch(w, "c1", 10)
	c1 := preCommit(t, w, 1)

	var intercepted atomic.Int64
	c.ControlKey(int16(kmsg.EndTxn), func(req kmsg.Request) (kmsg.Response, error, bool) {
		intercepted.Add(1)
		resp := req.ResponseKind().(*kmsg.EndTxnResponse)
		resp.SetVersion(req.GetVersion())
		resp.ErrorCode = kerr.UnknownServerError.Code
		resp.ProducerID, resp.ProducerEpoch = -1, -1
		return resp, nil, true // once: handling drops the control
	})
	if err := w.Commit(testCtx(t), []Committable{c1}); err != nil {
		t.Fatalf("commit with an ambiguous answer: %v", err)
	}
	if intercepted.Load() != 1 {
		t.Fatalf("EndTxn intercepted %d times", intercepted.Load())
	}
	// Slot 0 is rebuilt and serves checkpoint 4.
	var vs [][]string
	vs = append(vs, v1)
	for id := int64(2); id <= 4; id++ {
		vs = append(vs, writeBatch(w, "c"+string(rune('0'+id)), 10))
		if err := w.Commit(testCtx(t), []Committable{preCommit(t, w, id)}); err != nil {
			t.Fatal(err)
		}
	}
	expectExactly(t, readCommitted(t, c, outTopic, outPartitions), vs...)
}

// A produce that fails makes the barrier's wait fail, and the transaction
// is never committed.
func TestProduceErrorFailsWait(t *testing.T) {
	c := newCluster(t)
	k := newSink(t, c, nil)
	w := newWriter(t, k, 0)
	w.Write(&kgo.Record{Topic: k.ProgressTopic(), Value: []byte("x")}) // refused
	pc, err := w.PreCommit(testCtx(t), 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pc.Wait(testCtx(t)); err == nil || !strings.Contains(err.Error(), "progress topic") {
		t.Fatalf("wait: %v, want the refused record's error", err)
	}
}

func TestAtLeastOnceAndNone(t *testing.T) {
	for _, d := range []Delivery{AtLeastOnce, None} {
		t.Run(d.String(), func(t *testing.T) {
			c := newCluster(t)
			k := newSink(t, c, func(cfg *KafkaConfig) { cfg.Delivery = d })
			w := newWriter(t, k, 0)
			v1 := writeBatch(w, "c1", 20)
			pc, err := w.PreCommit(testCtx(t), 1)
			if err != nil {
				t.Fatal(err)
			}
			if cm, err := pc.Wait(testCtx(t)); err != nil || cm != nil {
				t.Fatalf("wait: %v %v, want nil, nil", cm, err)
			}
			if err := w.Commit(testCtx(t), nil); err != nil {
				t.Fatal(err)
			}
			if outs, err := k.Recover(testCtx(t), 0, nil); err != nil || len(outs) != 0 {
				t.Fatalf("recover: %v %v", outs, err)
			}
			if d == None {
				waitFor(t, 5*time.Second, "records to arrive", func() bool { return len(readCommitted(t, c, outTopic, outPartitions)) == 20 })
			}
			expectExactly(t, readCommitted(t, c, outTopic, outPartitions), v1)
		})
	}
}

func TestDelivery(t *testing.T) {
	var zero Delivery
	if zero != ExactlyOnce {
		t.Error("zero Delivery is not ExactlyOnce")
	}
	for _, d := range []Delivery{ExactlyOnce, AtLeastOnce, None} {
		got, err := ParseDelivery(d.String())
		if err != nil || got != d {
			t.Errorf("ParseDelivery(%q) = %v, %v", d.String(), got, err)
		}
	}
	if _, err := ParseDelivery("twice"); err == nil {
		t.Error("ParseDelivery accepted twice")
	}
}
