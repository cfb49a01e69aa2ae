package sink

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"

	"github.com/twmb/franz-go/pkg/kgo"
)

// slotState is where a pool slot's transactional id is.
type slotState int

const (
	// slotIdle: no transaction; the slot can begin the next one.
	slotIdle slotState = iota
	// slotOpen: the task is writing into the slot's transaction.
	slotOpen
	// slotPending: pre-committed, waiting for its checkpoint to complete.
	slotPending
	// slotCommitting: a Commit is ending the transaction.
	slotCommitting
	// slotBroken: a commit's answer was ambiguous and the outcome is not
	// resolved yet; the client's state is unknown.
	slotBroken
)

// slot is one transactional id of a task's pool with its client. A kgo
// client carries one transactional id.
type slot struct {
	idx    int
	id     string
	client *kgo.Client // replaced after an ambiguous commit; guarded by txnWriter.mu
	state  slotState   // guarded by txnWriter.mu
	txn    *txn        // open or pending transaction; guarded by txnWriter.mu
}

// txn is one transaction: the output of a task between two barriers.
type txn struct {
	slot   *slot
	client *kgo.Client // the slot's client when the transaction began
	b      *batch

	// Set by PreCommit on the task goroutine, before the barrier's
	// PreCommitted is handed out.
	checkpoint int64

	// prev is the previous transaction's batch, still being acknowledged
	// when this one began. Its producer is another client, so this
	// transaction's records are held back (in the task goroutine, in
	// order) until every record of prev is acknowledged: otherwise they
	// could land in a partition before prev's, and a key's outputs would
	// be out of order. Nil once released.
	prev *batch
	held []*kgo.Record

	// Set by the marker's promise.
	mu           sync.Mutex
	markerOffset int64
	producerID   int64
	epoch        int16
	markerErr    error

	markerPromise func(*kgo.Record, error)
}

// newTxn starts tracking the transaction that s's client began as producer
// id/epoch.
func newTxn(s *slot, client *kgo.Client, stats *counters, id int64, epoch int16) *txn {
	t := &txn{slot: s, client: client, b: newTxnBatch(stats, id, epoch), markerOffset: -1, checkpoint: -1}
	t.markerPromise = func(r *kgo.Record, err error) {
		if err == nil {
			err = checkEpoch(r, id, epoch)
		}
		t.mu.Lock()
		if err == nil {
			// The producer id and epoch the broker acknowledged the
			// marker with are those of this transaction.
			t.markerOffset, t.producerID, t.epoch = r.Offset, r.ProducerID, r.ProducerEpoch
		} else {
			t.markerErr = err
		}
		t.mu.Unlock()
		t.b.finish(err)
	}
	return t
}

// txnWriter is the exactly-once writer of one task: a pool of transactional
// producers used round robin, one transaction per checkpoint.
type txnWriter struct {
	k     *Kafka
	task  int32
	part  int32 // progress partition of the task's markers
	ctx   context.Context
	stop  context.CancelFunc
	log   *slog.Logger
	stats counters

	// cur is the open transaction; owned by the task goroutine (Write,
	// PreCommit). It is nil once the writer failed to move on.
	cur            *txn
	lastCheckpoint int64

	mu       sync.Mutex
	slots    []*slot
	pending  map[int64]*txn    // pre-committed by this writer, not committed
	resolved map[int64]Outcome // known outcomes of committables
	failed   error             // sticky: fenced, lost, unusable pool
	closed   bool
}

var (
	_ Writer        = (*txnWriter)(nil)
	_ StatsReporter = (*txnWriter)(nil)
)

// txnClient creates the producer of transactional id.
func (k *Kafka) txnClient(id string) (*kgo.Client, error) {
	opts := append([]kgo.Opt{kgo.ProducerLinger(linger)}, k.opts()...)
	opts = append(opts,
		kgo.TransactionalID(id),
		kgo.TransactionTimeout(k.cfg.TransactionTimeout),
		kgo.RecordPartitioner(&sinkPartitioner{
			progress: k.cfg.ProgressTopic,
			// nil hasher: murmur2, Kafka's default for keyed records.
			keyed:  kgo.StickyKeyPartitioner(nil),
			manual: kgo.ManualPartitioner(),
		}),
	)
	return kgo.NewClient(opts...)
}

// initProducerID makes cl send InitProducerID now (kgo would otherwise do it
// lazily on the first produce): for a transactional id this fences every
// previous producer of the id and aborts its open transaction.
func initProducerID(ctx context.Context, cl *kgo.Client, id string) error {
	for attempt := 0; ; attempt++ {
		_, _, err := cl.ProducerID(ctx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil || !retriable(err) {
			return fmt.Errorf("init producer id of %s: %w", id, err)
		}
		if err := sleepCtx(ctx, backoff(attempt)); err != nil {
			return fmt.Errorf("init producer id of %s: %w", id, err)
		}
	}
}

func newTxnWriter(ctx context.Context, k *Kafka, task int32) (*txnWriter, error) {
	n := k.cfg.PoolSize
	w := &txnWriter{
		k:              k,
		task:           task,
		part:           task % k.progressPartitions,
		log:            k.log.With("task", task),
		slots:          make([]*slot, n),
		pending:        make(map[int64]*txn),
		resolved:       make(map[int64]Outcome),
		lastCheckpoint: -1 << 63,
	}
	w.ctx, w.stop = context.WithCancel(context.Background())
	for i := range w.slots {
		id := k.TransactionalID(task, i)
		cl, err := k.txnClient(id)
		if err != nil {
			w.Close()
			return nil, fmt.Errorf("client of %s: %w", id, err)
		}
		w.slots[i] = &slot{idx: i, id: id, client: cl}
	}
	// Fence the pool: concurrently, a takeover waits on it.
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, s := range w.slots {
		wg.Go(func() { errs[i] = initProducerID(ctx, s.client, s.id) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		w.Close()
		return nil, err
	}
	// Ids of this task beyond today's pool (a larger pool before).
	if err := k.abortMatching(ctx, func(t int32, s int) bool { return t == task && s >= n }); err != nil {
		w.Close()
		return nil, fmt.Errorf("abort lingering transactions: %w", err)
	}
	first := w.slots[0]
	if err := first.client.BeginTransaction(); err != nil {
		w.Close()
		return nil, fmt.Errorf("begin transaction on %s: %w", first.id, err)
	}
	pid, epoch, err := first.client.ProducerID(ctx)
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("producer id of %s: %w", first.id, err)
	}
	first.state = slotOpen
	w.cur = newTxn(first, first.client, &w.stats, pid, epoch)
	first.txn = w.cur
	w.log.Info("exactly-once writer ready", "pool", n, "progress_partition", w.part)
	return w, nil
}

// Write adds r to the open transaction. Records for the progress topic are
// refused: the topic holds only the sink's markers.
func (w *txnWriter) Write(r *kgo.Record) {
	t := w.cur
	if t == nil {
		w.stats.errors.Add(1)
		return
	}
	if r.Topic == w.k.cfg.ProgressTopic {
		w.stats.errors.Add(1)
		t.b.fail(fmt.Errorf("record for topic %s refused: it is the sink's progress topic", r.Topic))
		return
	}
	w.stats.records.Add(1)
	if t.prev != nil && !t.release(w.ctx, nil) {
		t.held = append(t.held, r)
		return
	}
	t.b.add()
	t.client.Produce(w.ctx, r, t.b.promise)
}

// release produces (with produceCtx) the held records once the previous
// transaction's records are all acknowledged (or failed: then this task
// restarts anyway). A non-nil wait blocks until then or until wait ends; it
// reports whether the transaction's records may now be produced directly.
func (t *txn) release(produceCtx, wait context.Context) bool {
	if wait != nil {
		select {
		case <-t.prev.done:
		case <-t.prev.failed:
		case <-wait.Done():
			return false
		}
	} else {
		select {
		case <-t.prev.done:
		case <-t.prev.failed:
		default:
			return false
		}
	}
	t.prev = nil
	for _, r := range t.held {
		t.b.add()
		t.client.Produce(produceCtx, r, t.b.promise)
	}
	t.held = nil
	return true
}

// PreCommit seals the open transaction for checkpointID: it produces the
// progress marker into it and begins the next slot's transaction, with no
// broker round trip. If the next slot's transaction is still pending the
// barrier fails and nothing changes: the task keeps writing into the same
// transaction, which the next barrier seals.
func (w *txnWriter) PreCommit(ctx context.Context, checkpointID int64) (PreCommitted, error) {
	w.mu.Lock()
	failed, closed := w.failed, w.closed
	w.mu.Unlock()
	switch {
	case failed != nil:
		return nil, fmt.Errorf("pre-commit checkpoint %d of task %d: %w", checkpointID, w.task, failed)
	case closed || w.cur == nil:
		return nil, fmt.Errorf("pre-commit checkpoint %d of task %d: writer closed", checkpointID, w.task)
	case checkpointID <= w.lastCheckpoint:
		return nil, fmt.Errorf("pre-commit checkpoint %d of task %d: checkpoint ids must increase (last %d)", checkpointID, w.task, w.lastCheckpoint)
	}
	t := w.cur
	if t.prev != nil && !t.release(w.ctx, ctx) {
		return nil, fmt.Errorf("pre-commit checkpoint %d of task %d: previous transaction not acknowledged: %w", checkpointID, w.task, ctx.Err())
	}
	n := len(w.slots)
	value, err := json.Marshal(progressMarker{Task: w.task, Checkpoint: checkpointID, TransactionalID: t.slot.id})
	if err != nil {
		return nil, fmt.Errorf("pre-commit checkpoint %d of task %d: marker: %w", checkpointID, w.task, err)
	}

	w.mu.Lock()
	next := w.slots[(t.slot.idx+1)%n]
	if next.state != slotIdle {
		pendingID := int64(-1)
		if next.txn != nil {
			pendingID = next.txn.checkpoint
		}
		w.mu.Unlock()
		return nil, fmt.Errorf("pre-commit checkpoint %d of task %d: pool of %d transactional ids exhausted: checkpoint %d still pending", checkpointID, w.task, n, pendingID)
	}
	next.state = slotOpen // reserved
	nextClient := next.client
	w.mu.Unlock()

	// BeginTransaction is local to the client (the broker learns of the
	// transaction with its first record), and so is reading the producer
	// id the previous EndTxn answered.
	err = nextClient.BeginTransaction()
	var (
		pid   int64
		epoch int16
	)
	if err == nil {
		pid, epoch, err = nextClient.ProducerID(ctx)
	}
	if err != nil {
		err = fmt.Errorf("pre-commit checkpoint %d of task %d: begin transaction on %s: %w", checkpointID, w.task, next.id, err)
		w.mu.Lock()
		next.state = slotBroken
		w.mu.Unlock()
		w.fail(err)
		return nil, err
	}

	t.b.add()
	t.client.Produce(w.ctx, &kgo.Record{
		Topic:     w.k.cfg.ProgressTopic,
		Partition: w.part,
		Key:       []byte("task-" + strconv.Itoa(int(w.task))),
		Value:     value,
	}, t.markerPromise)
	t.checkpoint = checkpointID
	t.b.seal()
	w.lastCheckpoint = checkpointID

	nt := newTxn(next, nextClient, &w.stats, pid, epoch)
	nt.prev = t.b
	w.mu.Lock()
	t.slot.state = slotPending
	w.pending[checkpointID] = t
	next.txn = nt
	w.mu.Unlock()
	w.cur = nt
	return &txnPreCommitted{w: w, t: t}, nil
}

// flush waits until every record of the sealed transaction is acknowledged
// and returns the first produce error. It gives up at the first failed
// record: the transaction can never be committed, and a fenced producer can
// keep records buffered for a long time.
func (t *txn) flush(ctx context.Context) error {
	if !t.b.isDone() {
		fctx, cancel := context.WithCancel(ctx)
		defer cancel()
		flushed := make(chan error, 1)
		go func() { flushed <- t.client.Flush(fctx) }()
		select {
		case err := <-flushed:
			if err != nil {
				return err
			}
		case <-t.b.failed:
			return t.b.firstErr()
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	select {
	case <-t.b.done:
	case <-t.b.failed:
	case <-ctx.Done():
		return ctx.Err()
	}
	return t.b.firstErr()
}

// txnPreCommitted is a sealed transaction whose records may be in flight.
type txnPreCommitted struct {
	w *txnWriter
	t *txn
}

// Wait flushes the transaction's client and returns its committable. A
// failed produce fails the wait: that transaction must never be committed.
func (p *txnPreCommitted) Wait(ctx context.Context) (*Committable, error) {
	t, w := p.t, p.w
	wrap := func(err error) error {
		if isFenced(err) && !errors.Is(err, ErrFenced) {
			err = fmt.Errorf("%w: %w", ErrFenced, err)
		}
		return fmt.Errorf("flush transaction of checkpoint %d of task %d on %s: %w", t.checkpoint, w.task, t.slot.id, err)
	}
	if err := t.flush(ctx); err != nil {
		return nil, wrap(err)
	}
	t.mu.Lock()
	offset, pid, epoch := t.markerOffset, t.producerID, t.epoch
	t.mu.Unlock()
	if offset < 0 || pid < 0 {
		return nil, wrap(errors.New("the progress marker's produce answered no offset or producer id"))
	}
	// The client's id must still be the one the marker was written with:
	// a change means the transaction did not run on one producer epoch.
	cpid, cepoch, err := t.client.ProducerID(ctx)
	if err != nil {
		return nil, wrap(err)
	}
	if cpid != pid || cepoch != epoch {
		return nil, wrap(fmt.Errorf("producer id/epoch moved during the transaction: marker written as %d/%d, client now %d/%d", pid, epoch, cpid, cepoch))
	}
	return &Committable{
		CheckpointID:    t.checkpoint,
		TransactionalID: t.slot.id,
		ProducerID:      pid,
		Epoch:           epoch,
		Marker:          MarkerRef{Topic: w.k.cfg.ProgressTopic, Partition: w.part, Offset: offset},
	}, nil
}

// Commit commits cs in order, stopping at the first failure. A transaction
// this writer pre-committed is ended by its own producer; an ambiguous answer
// (fenced, invalid state, timeout, unknown) is resolved by the progress
// marker. A committable from an earlier owner is resumed like Recover does.
// Lost transactions give an error wrapping ErrTransactionLost, fencing one
// wrapping ErrFenced; both stop the writer.
func (w *txnWriter) Commit(ctx context.Context, cs []Committable) error {
	if len(cs) > 0 {
		w.mu.Lock()
		// Outcomes older than what the coordinator still lists are not
		// asked for again; if they are, resolving them again is correct.
		for id := range w.resolved {
			if id < cs[0].CheckpointID {
				delete(w.resolved, id)
			}
		}
		w.mu.Unlock()
	}
	for _, c := range cs {
		if err := w.commitOne(ctx, c); err != nil {
			return fmt.Errorf("commit checkpoint %d of task %d: %w", c.CheckpointID, w.task, err)
		}
	}
	return nil
}

func (w *txnWriter) commitOne(ctx context.Context, c Committable) error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return errors.New("writer closed")
	}
	if out, ok := w.resolved[c.CheckpointID]; ok {
		w.mu.Unlock()
		if out == Committed {
			return nil
		}
		return fmt.Errorf("transaction %s: %w", c.TransactionalID, ErrTransactionLost)
	}
	t := w.pending[c.CheckpointID]
	if t == nil {
		w.mu.Unlock()
		return w.commitForeign(ctx, c)
	}
	if t.slot.id != c.TransactionalID {
		w.mu.Unlock()
		return fmt.Errorf("committable names transactional id %s, but this writer pre-committed the checkpoint on %s", c.TransactionalID, t.slot.id)
	}
	state := t.slot.state
	if state == slotCommitting {
		w.mu.Unlock()
		return errors.New("a commit of this checkpoint is already in progress")
	}
	t.slot.state = slotCommitting
	w.mu.Unlock()

	if state == slotBroken {
		// An earlier attempt's answer was ambiguous: only the marker
		// knows.
		return w.resolveOwned(ctx, t, c, errors.New("earlier commit attempt unresolved"))
	}
	restore := func() {
		w.mu.Lock()
		t.slot.state = slotPending
		w.mu.Unlock()
	}
	// Normally done by Wait already; kgo requires it before EndTransaction.
	if err := t.flush(ctx); err != nil {
		restore()
		if ctx.Err() != nil {
			return err
		}
		// kgo would commit whatever succeeded: never end a transaction
		// that lost a record with a commit.
		err = fmt.Errorf("transaction %s has a failed produce and cannot be committed: %w", t.slot.id, err)
		w.fail(err)
		return err
	}
	t.mu.Lock()
	match := t.markerOffset == c.Marker.Offset && t.producerID == c.ProducerID && t.epoch == c.Epoch
	t.mu.Unlock()
	if !match {
		restore()
		return fmt.Errorf("committable %+v does not match the transaction this writer pre-committed", c)
	}
	endErr := t.client.EndTransaction(ctx, kgo.TryCommit)
	if endErr == nil {
		w.mu.Lock()
		t.slot.state = slotIdle
		t.slot.txn = nil
		delete(w.pending, c.CheckpointID)
		w.resolved[c.CheckpointID] = Committed
		w.mu.Unlock()
		w.stats.committed.Add(1)
		return nil
	}
	// After an unconfirmed end kgo re-initialises the producer id on its
	// next use, and InitProducerID aborts the transaction we may still be
	// able to commit: retire the client at once (it is replaced once the
	// outcome is known).
	w.mu.Lock()
	retired := t.slot.client
	t.slot.client = nil
	w.mu.Unlock()
	retired.Close()
	w.log.Warn("commit answer ambiguous; reading the progress marker", "checkpoint", c.CheckpointID,
		"transactional_id", c.TransactionalID, "err", endErr)
	return w.resolveOwned(ctx, t, c, endErr)
}

// resolveOwned decides a transaction of this writer whose commit answer was
// endErr (not a clean success).
func (w *txnWriter) resolveOwned(ctx context.Context, t *txn, c Committable, endErr error) error {
	out, err := w.k.resolve(ctx, w.task, c)
	if err != nil {
		w.mu.Lock()
		t.slot.state = slotBroken
		w.mu.Unlock()
		return fmt.Errorf("commit answered %v, and the outcome is not known yet: %w", endErr, err)
	}
	fenced := isFenced(endErr)
	w.mu.Lock()
	delete(w.pending, c.CheckpointID)
	w.resolved[c.CheckpointID] = out
	t.slot.state = slotBroken // until its client is rebuilt
	w.mu.Unlock()
	w.log.Info("ambiguous commit resolved by the progress marker", "checkpoint", c.CheckpointID,
		"transactional_id", c.TransactionalID, "outcome", out, "answer", endErr)

	if out == Lost {
		var err error
		if fenced {
			err = fmt.Errorf("transaction %s (producer %d, epoch %d), commit answered %v: %w (%w)", c.TransactionalID, c.ProducerID, c.Epoch, endErr, ErrTransactionLost, ErrFenced)
		} else {
			err = fmt.Errorf("transaction %s (producer %d, epoch %d), commit answered %v: %w", c.TransactionalID, c.ProducerID, c.Epoch, endErr, ErrTransactionLost)
		}
		w.fail(err)
		return err
	}
	w.stats.committed.Add(1)
	if fenced {
		// Someone else (a new owner's Recover) committed it: this
		// writer is a zombie.
		err := fmt.Errorf("transaction %s was committed by another owner: %w", c.TransactionalID, ErrFenced)
		w.fail(err)
		return err
	}
	// The client is in an unknown state after an ambiguous end; a fresh
	// producer for the id (InitProducerID: nothing of ours is open on it
	// any more) makes the slot usable again.
	if err := w.rebuildSlot(ctx, t.slot); err != nil {
		w.fail(fmt.Errorf("transactional id %s unusable after an ambiguous commit: %w", t.slot.id, err))
	}
	return nil
}

// commitForeign resolves a committable this writer did not pre-commit (an
// earlier owner's, still listed by the checkpoint). Fencing by NewWriter
// aborted it if it was still open, so it is normally already decided.
func (w *txnWriter) commitForeign(ctx context.Context, c Committable) error {
	out, err := w.k.resolve(ctx, w.task, c)
	if err != nil {
		return err
	}
	w.mu.Lock()
	w.resolved[c.CheckpointID] = out
	w.mu.Unlock()
	if out == Lost {
		return fmt.Errorf("transaction %s of an earlier owner: %w", c.TransactionalID, ErrTransactionLost)
	}
	return nil
}

// rebuildSlot replaces a slot's client by a fresh producer of the same id.
func (w *txnWriter) rebuildSlot(ctx context.Context, s *slot) error {
	cl, err := w.k.txnClient(s.id)
	if err != nil {
		return err
	}
	if err := initProducerID(ctx, cl, s.id); err != nil {
		cl.Close()
		return err
	}
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		cl.Close()
		return errors.New("writer closed")
	}
	old := s.client
	s.client = cl
	s.state = slotIdle
	s.txn = nil
	w.mu.Unlock()
	if old != nil {
		old.Close()
	}
	return nil
}

// fail makes the writer refuse further barriers with err.
func (w *txnWriter) fail(err error) {
	w.mu.Lock()
	if w.failed == nil {
		w.failed = err
	}
	w.mu.Unlock()
}

// Close closes the producers without ending their transactions, exactly like
// a crash: the next owner's fencing aborts what is open, or its Recover
// commits what a complete checkpoint lists.
func (w *txnWriter) Close() {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return
	}
	w.closed = true
	var clients []*kgo.Client
	for _, s := range w.slots {
		if s != nil && s.client != nil {
			clients = append(clients, s.client)
		}
	}
	w.mu.Unlock()
	w.stop()
	for _, cl := range clients {
		cl.Close()
	}
}

// Stats returns the writer's counters.
func (w *txnWriter) Stats() WriterStats { return w.stats.Stats() }

// sinkPartitioner partitions user records by key like Kafka's default
// partitioner (murmur2) and the progress topic's markers by their explicit
// Record.Partition.
type sinkPartitioner struct {
	progress string
	keyed    kgo.Partitioner
	manual   kgo.Partitioner
}

// ForTopic implements kgo.Partitioner.
func (p *sinkPartitioner) ForTopic(topic string) kgo.TopicPartitioner {
	if topic == p.progress {
		return p.manual.ForTopic(topic)
	}
	return p.keyed.ForTopic(topic)
}
