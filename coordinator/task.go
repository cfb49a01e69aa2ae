package coordinator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/sluice-stream/sluice/operators"
	"github.com/sluice-stream/sluice/sink"
	"github.com/sluice-stream/sluice/state"
)

// ErrTakenOver means another owner claimed the task: this one must stop and
// never complete a checkpoint or commit again.
var ErrTakenOver = errors.New("task was taken over by another owner")

// TaskConfig is everything one task incarnation needs.
type TaskConfig struct {
	Job     *operators.Job
	Task    int32
	Storage Storage
	Sink    sink.Sink
	State   state.Factory
	Input   Input
	// WorkDir is the task's local folder for its state; the takeover wipes
	// it and rebuilds the state from storage, except its cache folder of
	// state files that a restore reuses instead of downloading them.
	WorkDir  string
	Settings Settings
	// Owner identifies this incarnation in metadata; unique per incarnation.
	Owner string
	// Trigger delivers barrier requests from the instance's coordinator.
	Trigger <-chan struct{}
	// Hook, when set, is called at every protocol step (tests inject crashes).
	Hook Hook
	Log  *slog.Logger
	// Stats receives the task's counters; may be shared by incarnations.
	Stats *TaskStats
	// Partitions is the job's number of tasks (input partitions), written
	// into savepoint parts; 0 if unknown.
	Partitions int32
	// Import, when set, restores the task once from a savepoint or another
	// job's checkpoints (run --from).
	Import *ImportConfig
	// OpenLocation opens the storage at a savepoint's location.
	OpenLocation func(ctx context.Context, location string) (Storage, error)

	// requests delivers savepoint requests; control is the instance's
	// record of them. Both nil without savepoints.
	requests <-chan SavepointRequest
	control  *savepointControl
}

// ImportConfig says where a task's state comes from on its first start
// (run --from).
type ImportConfig struct {
	// From is the location of a savepoint or of a job's checkpoint folder.
	From string
	// AllowNonRestoredState drops state of operators the job no longer has
	// instead of refusing to start.
	AllowNonRestoredState bool
	// Partitions is the number of input partitions (= tasks) now.
	Partitions int32
}

// TaskStats are a task's counters, updated atomically.
type TaskStats struct {
	RecordsIn            atomic.Int64
	RecordsOut           atomic.Int64
	CheckpointsCompleted atomic.Int64
	CheckpointsFailed    atomic.Int64
	LastCheckpointID     atomic.Int64
	LastCheckpointNanos  atomic.Int64
	Restored             atomic.Int64 // id of the checkpoint the task restored
	Running              atomic.Bool  // restored and processing
	// Stopped: the task stopped with a savepoint and processes nothing.
	Stopped atomic.Bool
	// Lag is the input records behind the end of the log, as of the last
	// batch fetched.
	Lag atomic.Int64

	history history
	// observe, when set, is called with every finished checkpoint.
	observe func(CheckpointRecord)
}

// Task is one incarnation of a task: takeover, then the record loop with
// barriers, with checkpoints completed and committed asynchronously.
type Task struct {
	cfg  TaskConfig
	job  string
	log  *slog.Logger
	st   *TaskStats
	hook Hook

	store  *state.Store
	writer sink.Writer
	out    suppressWriter
	chain  operators.Chain
	feed   Feed

	// Owned by the task goroutine.
	position    map[string]int64 // next offset per input topic
	nextID      int64
	lastBarrier time.Time
	txnOpened   time.Time // when the current transaction began
	// restoredFrom is the import lineage, carried into every checkpoint.
	restoredFrom string
	// frontier is set while the task replays input whose output is already
	// committed (after a rollback): output of records below it is dropped.
	frontier map[string]int64
	hwm      map[string]int64 // end offset per input topic, as last fetched
	// stuck counts consecutive barriers skipped because failed checkpoints
	// hold every transactional id.
	stuck int
	// savepoints are the requests this task has yet to write its part of,
	// in arrival order; the first is attached to the next barrier.
	savepoints []SavepointRequest
	// spInFlight is the id of the request whose barrier is being completed.
	spInFlight string
	// stopped: the task took the barrier of a stop-with-savepoint (its
	// request is stoppedBy) and processes nothing more.
	stopped   bool
	stoppedBy SavepointRequest

	// Shared with the checkpointer goroutine.
	pendingCount atomic.Int32 // pre-committed, not committed transactions
	lastDone     atomic.Int64 // unix nanos of the last checkpoint completion

	cp *checkpointer
	// cache keeps shareable state files across restores; restored says
	// what the restore took from it and what it downloaded.
	cache    *localCache
	restored restoreCounts
}

// suppressWriter drops output while the task replays input whose output is
// already committed (after a lost transaction rolled the state back).
type suppressWriter struct {
	sink.Writer
	suppress bool
	out      *atomic.Int64
}

func (w *suppressWriter) Write(r *kgo.Record) {
	if w.suppress {
		return
	}
	w.out.Add(1)
	w.Writer.Write(r)
}

// NewTask prepares a task incarnation; Run does the work.
func NewTask(cfg TaskConfig) *Task {
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	st := cfg.Stats
	if st == nil {
		st = &TaskStats{}
	}
	hook := cfg.Hook
	if hook == nil {
		hook = func(int32, Step, int64) error { return nil }
	}
	return &Task{cfg: cfg, job: cfg.Job.Name(), log: log.With("task", cfg.Task), st: st, hook: hook}
}

func (t *Task) step(s Step, id int64) error {
	if err := t.hook(t.cfg.Task, s, id); err != nil {
		return fmt.Errorf("task %d at step %s of checkpoint %d: %w", t.cfg.Task, s, id, err)
	}
	return nil
}

// Run takes the task over, then processes records until ctx is done (then it
// takes a final checkpoint and commits it) or an error stops it. On error the
// task stops like a crash: the next incarnation's takeover cleans up.
func (t *Task) Run(ctx context.Context) (err error) {
	defer t.close()
	t.st.Stopped.Store(false)
	restored, err := t.takeover(ctx)
	if err != nil {
		return err
	}
	// The checkpointer outlives ctx: the final checkpoint still needs it.
	cpCtx, cancelCP := context.WithCancel(context.WithoutCancel(ctx))
	t.cp = newCheckpointer(t, restored, cancelCP)
	go t.cp.run(cpCtx)

	if err := t.resumeStopped(ctx, restored[0]); err != nil {
		return err
	}
	t.st.Running.Store(true)
	defer t.st.Running.Store(false)
	bctx, stopBarriers := barrierContext(ctx, t.cfg.Settings.StopTimeout)
	defer stopBarriers()
	err = t.loop(ctx, bctx)
	if err == nil {
		if cause := context.Cause(ctx); errors.Is(cause, ErrLost) {
			return cause // another owner may run it: no final checkpoint
		}
		if t.stopped {
			return nil // its newest checkpoint is the stop barrier
		}
		if t.stopInFlight() {
			// The stop barrier is the final checkpoint: no other may follow.
			wctx, cancel := stopBound(ctx, t.cfg.Settings.StopTimeout)
			defer cancel()
			return t.cp.waitIdle(wctx)
		}
		err = t.stopGracefully(ctx)
	}
	return err
}

// barrierContext returns the context of the barriers the record loop takes:
// ctx, except that a graceful stop (ctx cancelled with cause
// context.Canceled: the task was revoked) gives a barrier in progress as
// long to finish as the final checkpoint gets (stopBound: grace, or less
// if the revoke has a deadline). Interrupted, the barrier would fail after
// sealing the state's write buffer (so the task must crash rather than go
// on), and the task would stop without its final checkpoint: the next owner
// would replay everything since the previous one. A lost task (any other
// cause, such as ErrLost) stops at once.
func barrierContext(ctx context.Context, grace time.Duration) (context.Context, context.CancelFunc) {
	bctx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, func() {
		cause := context.Cause(ctx)
		if !errors.Is(cause, context.Canceled) {
			cancel(cause)
			return
		}
		sctx, release := stopBound(ctx, grace)
		context.AfterFunc(sctx, func() { cancel(context.Cause(sctx)) })
		context.AfterFunc(bctx, release) // the task is done: free the timer
	})
	return bctx, func() { stop(); cancel(nil) }
}

// stopBound returns the context that bounds a graceful stop of the task
// whose context is ctx (the final checkpoint, a barrier in progress): it
// ends grace from now or, if the task was revoked (cause revoked), when the
// revoke's context ends, whichever comes first. Past the revoke's deadline
// the group moves the task on anyway; the task then stops at once and the
// next owner recovers it from its newest complete checkpoint.
func stopBound(ctx context.Context, grace time.Duration) (context.Context, context.CancelFunc) {
	sctx, cancel := context.WithTimeoutCause(context.Background(), grace,
		fmt.Errorf("stop timeout %s passed: %w", grace, context.DeadlineExceeded))
	var r revoked
	if !errors.As(context.Cause(ctx), &r) || r.ctx == nil {
		return sctx, cancel
	}
	sctx, cancelRevoked := context.WithCancelCause(sctx)
	stop := context.AfterFunc(r.ctx, func() {
		cancelRevoked(fmt.Errorf("revoke deadline passed: %w", context.Cause(r.ctx)))
	})
	return sctx, func() { stop(); cancelRevoked(nil); cancel() }
}

// loop processes records and takes barriers (with bctx, see barrierContext)
// until ctx is done (nil) or an error stops the task.
func (t *Task) loop(ctx, bctx context.Context) error {
	batches := t.feed.Batches()
	for {
		in := batches
		if t.stopRequested() {
			in = nil // nothing is processed after a stop barrier
		}
		select {
		case <-ctx.Done():
			return nil
		case err := <-t.cp.fatal:
			return err
		case <-t.cfg.Trigger:
			if err := t.maybeBarrier(bctx); err != nil {
				return err
			}
		case r := <-t.cfg.requests:
			if err := t.onSavepointRequest(bctx, r); err != nil {
				return err
			}
		case res := <-t.cp.savepointDone:
			t.onSavepointDone(res)
		case b := <-in:
			if b.Err != nil {
				return fmt.Errorf("task %d: %w", t.cfg.Task, b.Err)
			}
			if err := t.process(b.Records); err != nil {
				return err
			}
			if n := len(b.Records); n > 0 {
				t.noteLag(b.Records[n-1].Topic, b.HighWatermark)
			}
		}
	}
}

func (t *Task) process(records []*kgo.Record) error {
	for _, r := range records {
		next, ok := t.position[r.Topic]
		if !ok || r.Offset < next {
			continue // not ours, or already processed
		}
		if t.frontier != nil {
			t.out.suppress = r.Offset < t.frontier[r.Topic]
		}
		if err := t.chain(r); err != nil {
			return fmt.Errorf("task %d: record %s/%d@%d: %w", t.cfg.Task, r.Topic, r.Partition, r.Offset, err)
		}
		t.position[r.Topic] = r.Offset + 1
		t.st.RecordsIn.Add(1)
		if err := t.step(StepRecord, t.nextID); err != nil {
			return err
		}
	}
	return nil
}

// noteLag updates the task's consumer lag: records behind the end of each
// input partition, summed.
func (t *Task) noteLag(topic string, hwm int64) {
	if t.hwm == nil {
		t.hwm = map[string]int64{}
	}
	t.hwm[topic] = hwm
	var lag int64
	for tp, end := range t.hwm {
		lag += max(end-t.position[tp], 0)
	}
	t.st.Lag.Store(lag)
}

// maybeBarrier takes a barrier unless the pool of pending transactions is
// full or the minimum pause since the last completion has not passed.
//
// A full pool with no checkpoint in flight means every pending transaction
// belongs to a failed checkpoint: no checkpoint can complete any more, so
// past the tolerable number of such skipped barriers the task restarts from
// its newest complete checkpoint (aborting the pending transactions and
// replaying their input).
func (t *Task) maybeBarrier(ctx context.Context) error {
	if t.stopped {
		return t.retryStopPart(ctx) // no checkpoint may follow the stop barrier
	}
	if t.stopInFlight() {
		return nil
	}
	if int(t.pendingCount.Load()) >= t.cfg.Settings.MaxPending {
		if t.cp.outstanding.Load() == 0 {
			t.stuck++
			t.st.CheckpointsFailed.Add(1)
			t.log.Warn("barrier skipped: every transactional id of the pool is pending on a failed checkpoint", "pending", t.pendingCount.Load(), "skipped", t.stuck)
			if t.stuck > t.cfg.Settings.TolerableFailures {
				return fmt.Errorf("task %d: %d transactions pending on failed checkpoints and no transactional id free", t.cfg.Task, t.pendingCount.Load())
			}
			if f := t.cp.lastFailed.Load(); f != nil {
				// The store may be back: try the newest failed checkpoint
				// again, which commits every pending transaction.
				return t.cp.submit(ctx, f.retryJob())
			}
		}
		return nil
	}
	t.stuck = 0
	if p := t.cfg.Settings.MinPause; p > 0 && time.Since(time.Unix(0, t.lastDone.Load())) < p {
		return nil
	}
	return t.barrier(ctx)
}

// barrier is the synchronous part of a checkpoint: note the input position,
// seal the state's write buffer, pre-commit the sink's transaction, and hand
// the rest to the checkpointer. Nothing here grows with state size.
func (t *Task) barrier(ctx context.Context) error {
	id := t.nextID
	if err := t.step(StepBarrier, id); err != nil {
		return err
	}
	start := time.Now()
	offsets := maps.Clone(t.position)
	if t.frontier != nil && offsetsLE(t.frontier, offsets) {
		t.frontier, t.out.suppress = nil, false
	}
	sealed := t.store.Seal()
	pre, err := t.writer.PreCommit(ctx, id)
	if err != nil {
		return fmt.Errorf("pre-commit checkpoint %d of task %d: %w", id, t.cfg.Task, err)
	}
	t.nextID++
	t.pendingCount.Add(1)
	now := time.Now()
	job := &checkpointJob{id: id, offsets: offsets, sealed: sealed, pre: pre, barrier: now, txnOpened: t.txnOpened, syncPause: time.Since(start)}
	if t.spInFlight == "" && len(t.savepoints) > 0 {
		r := t.savepoints[0]
		job.savepoint, t.spInFlight = &r, r.ID
	}
	t.txnOpened = now
	t.lastBarrier = now
	return t.cp.submit(ctx, job)
}

// stopGracefully takes a final checkpoint and waits until it is committed,
// so a rolling restart neither loses nor replays anything. It is bounded by
// stopBound: StopTimeout, or the deadline of the revoke that stopped the
// task (ctx is the task's context, cancelled by the stop).
func (t *Task) stopGracefully(ctx context.Context) error {
	ctx, cancel := stopBound(ctx, t.cfg.Settings.StopTimeout)
	defer cancel()
	if err := t.cp.waitIdle(ctx); err != nil {
		return fmt.Errorf("final checkpoint of task %d: %w", t.cfg.Task, err)
	}
	if n := t.pendingCount.Load(); int(n) >= t.cfg.Settings.MaxPending {
		return fmt.Errorf("final checkpoint of task %d impossible: %d transactions pending on failed checkpoints; the next owner recovers from the newest complete one", t.cfg.Task, n)
	}
	id := t.nextID
	if err := t.barrier(ctx); err != nil {
		return fmt.Errorf("final checkpoint of task %d: %w", t.cfg.Task, err)
	}
	if err := t.cp.waitIdle(ctx); err != nil {
		return fmt.Errorf("final checkpoint of task %d: %w", t.cfg.Task, err)
	}
	if t.pendingCount.Load() != 0 {
		return fmt.Errorf("final checkpoint %d of task %d did not complete; the next owner recovers from the previous one", id, t.cfg.Task)
	}
	t.log.Info("task stopped after final checkpoint", "checkpoint", id)
	return nil
}

func (t *Task) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if t.cp != nil {
		t.cp.stop()
	}
	if t.feed != nil {
		_ = t.feed.Close(ctx)
	}
	if t.writer != nil {
		t.writer.Close()
	}
	if t.store != nil {
		_ = t.store.Close()
	}
}

// localStateDir is where the task's backend lives.
func (t *Task) localStateDir() string { return filepath.Join(t.cfg.WorkDir, "db") }

// localCheckpointDir is where a backend checkpoint is written before upload.
func (t *Task) localCheckpointDir(id int64) string {
	return filepath.Join(t.cfg.WorkDir, "checkpoints", fmt.Sprintf("chk-%d", id))
}

// restoreState rebuilds the task's backend from a checkpoint's files,
// linking the shareable ones this work dir's cache has and downloading the
// rest.
func (t *Task) restoreState(ctx context.Context, c *Checkpoint) error {
	dir := t.localStateDir()
	t.cache = newLocalCache(filepath.Join(t.cfg.WorkDir, localCacheDir), t.log)
	if err := clearWorkDir(t.cfg.WorkDir); err != nil {
		return fmt.Errorf("clear work dir of task %d: %w", t.cfg.Task, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create work dir of task %d: %w", t.cfg.Task, err)
	}
	store, n, err := openCheckpointState(ctx, t.cfg.Storage, t.cfg.State, c, dir, t.cache)
	if err != nil {
		return err
	}
	t.store, t.restored = store, n
	return nil
}
