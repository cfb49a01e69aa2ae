package coordinator

import (
	"context"
	"fmt"
	"sync"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/sluice-stream/sluice/sink"
	"github.com/sluice-stream/sluice/source"
)

// fakeBroker models what the protocol relies on of Kafka transactions
// (protocol v2, KIP-890): one open transaction per transactional id, an epoch
// that moves on at every end of a transaction (so id and epoch name one
// transaction), fencing by a newer epoch (InitProducerID aborts the open
// transaction), commit by resuming with the recorded id and epoch, aborts by
// the broker (timeout or crash), and what a read_committed reader sees.
// Outcomes are known exactly, which plays the role of the progress marker.
type fakeBroker struct {
	mu      sync.Mutex
	epochs  map[string]int16    // current epoch per transactional id
	open    map[string]*fakeTxn // open transaction per transactional id
	outcome map[txnKey]sink.Outcome
	log     []fakeRecord // every record ever written, in write order
	// recoveredLost counts pre-committed transactions that a takeover
	// found lost (the rollback path ran).
	recoveredLost int
}

type txnKey struct {
	id    string
	epoch int16
}

type fakeTxn struct {
	key     txnKey
	records []int // indexes into log
}

type fakeRecord struct {
	rec   *kgo.Record
	key   txnKey
	state sink.Outcome // 0 while open
}

func newFakeBroker() *fakeBroker {
	return &fakeBroker{epochs: map[string]int16{}, open: map[string]*fakeTxn{}, outcome: map[txnKey]sink.Outcome{}}
}

// initProducer fences the id: its open transaction is aborted.
func (b *fakeBroker) initProducer(id string) int16 {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.endLocked(id, sink.Lost)
	b.epochs[id]++
	return b.epochs[id]
}

func (b *fakeBroker) endLocked(id string, o sink.Outcome) {
	txn := b.open[id]
	if txn == nil {
		return
	}
	for _, i := range txn.records {
		b.log[i].state = o
	}
	b.outcome[txn.key] = o
	delete(b.open, id)
	b.epochs[id]++
}

func (b *fakeBroker) write(id string, epoch int16, r *kgo.Record) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.epochs[id] != epoch {
		return sink.ErrFenced
	}
	txn := b.open[id]
	if txn == nil {
		txn = &fakeTxn{key: txnKey{id, epoch}}
		b.open[id] = txn
		b.outcome[txn.key] = 0
	}
	txn.records = append(txn.records, len(b.log))
	b.log = append(b.log, fakeRecord{rec: r, key: txn.key})
	return nil
}

// endTxn commits the open transaction if id and epoch match, and reports the
// transaction's outcome as its marker would.
func (b *fakeBroker) endTxn(id string, epoch int16) (sink.Outcome, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if txn := b.open[id]; txn != nil && txn.key.epoch == epoch {
		b.endLocked(id, sink.Committed)
	}
	o := b.outcome[txnKey{id, epoch}]
	if b.epochs[id] == epoch {
		b.epochs[id]++ // an empty transaction ends too
	}
	if o == 0 {
		o = sink.Lost // never opened: nothing of it is visible
	}
	return o, nil
}

// abortAll aborts every open transaction, as kfake does after a kill -9.
func (b *fakeBroker) abortAll() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for id := range b.open {
		b.endLocked(id, sink.Lost)
	}
}

// readCommitted returns what a read_committed reader sees of topic.
func (b *fakeBroker) readCommitted(topic string) []*kgo.Record {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []*kgo.Record
	for _, r := range b.log {
		if r.state == sink.Committed && r.rec.Topic == topic {
			out = append(out, r.rec)
		}
	}
	return out
}

func (b *fakeBroker) openCount() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.open)
}

// fakeSink is a transactional sink.Sink on a fakeBroker with a pool of ids.
type fakeSink struct {
	b    *fakeBroker
	pool int
}

func (s *fakeSink) id(task int32, slot int) string { return fmt.Sprintf("fake-%d-%d", task, slot) }

func (s *fakeSink) Recover(_ context.Context, task int32, cs []sink.Committable) ([]sink.Outcome, error) {
	out := make([]sink.Outcome, len(cs))
	lost := false
	for i, c := range cs {
		if lost {
			out[i] = sink.Lost
			continue
		}
		// The answer of EndTxn may be lost; the marker (the fake's exact
		// outcome) decides either way.
		o, _ := s.b.endTxn(c.TransactionalID, c.Epoch)
		out[i] = o
		lost = o == sink.Lost
		if lost {
			s.b.mu.Lock()
			s.b.recoveredLost++
			s.b.mu.Unlock()
		}
	}
	return out, nil
}

func (s *fakeSink) NewWriter(_ context.Context, task int32) (sink.Writer, error) {
	w := &fakeWriter{s: s, task: task, epochs: make([]int16, s.pool), pendingID: make([]int64, s.pool)}
	for slot := range s.pool {
		w.epochs[slot] = s.b.initProducer(s.id(task, slot))
	}
	return w, nil
}

func (s *fakeSink) Close() {}

type fakeWriter struct {
	s         *fakeSink
	task      int32
	mu        sync.Mutex
	slot      int
	epochs    []int16
	pendingID []int64 // checkpoint id pending on each slot, 0 if free
	err       error
}

func (w *fakeWriter) Write(r *kgo.Record) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.s.b.write(w.s.id(w.task, w.slot), w.epochs[w.slot], r); err != nil && w.err == nil {
		w.err = err
	}
}

type fakePre struct {
	c   *sink.Committable
	err error
}

func (p fakePre) Wait(context.Context) (*sink.Committable, error) { return p.c, p.err }

func (w *fakeWriter) PreCommit(_ context.Context, id int64) (sink.PreCommitted, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	slot := w.slot
	txid := w.s.id(w.task, slot)
	// An empty transaction is still a transaction here: the real sink always
	// writes a marker.
	if err := w.s.b.write(txid, w.epochs[slot], &kgo.Record{Topic: "progress"}); err != nil && w.err == nil {
		w.err = err
	}
	next := (slot + 1) % len(w.epochs)
	if w.pendingID[next] != 0 {
		return nil, fmt.Errorf("pool exhausted: checkpoint %d still pending", w.pendingID[next])
	}
	w.pendingID[slot] = id
	w.slot = next
	err := w.err
	w.err = nil
	return fakePre{c: &sink.Committable{CheckpointID: id, TransactionalID: txid, Epoch: w.epochs[slot]}, err: err}, nil
}

func (w *fakeWriter) Commit(_ context.Context, cs []sink.Committable) error {
	for _, c := range cs {
		o, _ := w.s.b.endTxn(c.TransactionalID, c.Epoch)
		if o != sink.Committed {
			return fmt.Errorf("checkpoint %d: %w", c.CheckpointID, sink.ErrFenced)
		}
		w.mu.Lock()
		for slot := range w.pendingID {
			if w.s.id(w.task, slot) == c.TransactionalID {
				w.pendingID[slot] = 0
				w.epochs[slot] = c.Epoch + 1 // as the EndTxn answer tells kgo
			}
		}
		w.mu.Unlock()
	}
	return nil
}

func (w *fakeWriter) Close() {}

// fakeInput serves fixed input partitions from memory.
type fakeInput struct {
	mu        sync.Mutex
	topic     string
	parts     map[int32][]*kgo.Record
	start     map[int32]int64 // log start offset (retention)
	committed map[int32]int64 // offsets committed to the group
}

func newFakeInput(topic string, parts map[int32][]*kgo.Record) *fakeInput {
	return &fakeInput{topic: topic, parts: parts, start: map[int32]int64{}, committed: map[int32]int64{}}
}

func (in *fakeInput) StartOffsets(_ context.Context, task int32) (map[string]int64, error) {
	return map[string]int64{in.topic: 0}, nil
}

func (in *fakeInput) CheckAvailable(_ context.Context, task int32, offsets map[string]int64) error {
	in.mu.Lock()
	defer in.mu.Unlock()
	if offsets[in.topic] < in.start[task] {
		return fmt.Errorf("%w: task %d needs offset %d, log starts at %d", source.ErrInputGone, task, offsets[in.topic], in.start[task])
	}
	return nil
}

func (in *fakeInput) Open(ctx context.Context, task int32, offsets map[string]int64) (Feed, error) {
	f := &fakeFeed{c: make(chan source.Batch), done: make(chan struct{})}
	recs := in.parts[task]
	from := offsets[in.topic]
	go func() {
		const batch = 7
		for i := from; i < int64(len(recs)); i += batch {
			select {
			case f.c <- source.Batch{Records: recs[i:min(i+batch, int64(len(recs)))]}:
			case <-f.done:
				return
			}
		}
	}()
	return f, nil
}

func (in *fakeInput) CommitOffsets(_ context.Context, task int32, offsets map[string]int64) error {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.committed[task] = offsets[in.topic]
	return nil
}

type fakeFeed struct {
	c    chan source.Batch
	done chan struct{}
	once sync.Once
}

func (f *fakeFeed) Batches() <-chan source.Batch { return f.c }

func (f *fakeFeed) Close(context.Context) error {
	f.once.Do(func() { close(f.done) })
	return nil
}
