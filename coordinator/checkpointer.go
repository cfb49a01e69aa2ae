package coordinator

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/sluice-stream/sluice/sink"
	"github.com/sluice-stream/sluice/state"
)

// checkpointJob is a checkpoint whose synchronous part (the barrier) is done.
type checkpointJob struct {
	id        int64
	offsets   map[string]int64
	sealed    *state.Sealed
	pre       sink.PreCommitted
	barrier   time.Time
	txnOpened time.Time
	syncPause time.Duration
	// savepoint, when set, is the request whose part this checkpoint
	// writes once its transactions are committed.
	savepoint *SavepointRequest
	// savepointReported: the task was told the outcome.
	savepointReported bool
	// retry: this completes the failed checkpoint id again (retryJob).
	retry bool
}

// retryJob is a second attempt at a failed checkpoint, made when every
// transactional id is pending on failed checkpoints (so no barrier can be
// taken) and none is in flight. Its state is the backend's as it is: only
// sealed buffers of barriers reach the backend, and the failed checkpoint
// was the newest barrier. Its metadata lists every pending transaction, as
// the first attempt's would have.
func (j *checkpointJob) retryJob() *checkpointJob {
	return &checkpointJob{id: j.id, offsets: j.offsets, barrier: time.Now(), txnOpened: j.txnOpened, retry: true}
}

// checkpointer runs the asynchronous part of a task's checkpoints, one at a
// time in barrier order: persist state, flush the sink, upload, create the
// metadata (completion), commit, report offsets, apply retention.
type checkpointer struct {
	t    *Task
	jobs chan *checkpointJob
	// fatal carries the error that must stop the task (at most one).
	fatal chan error
	// lastFailed is the newest checkpoint that failed, nil once one
	// completes; the task retries it when no barrier can be taken.
	lastFailed atomic.Pointer[checkpointJob]
	// savepointDone tells the task the outcome of each savepoint barrier.
	savepointDone chan savepointResult
	// outstanding counts submitted jobs not yet finished; idle is signalled
	// after each.
	outstanding atomic.Int32
	idle        chan struct{}
	done        chan struct{}
	cancel      context.CancelFunc

	// Owned by the checkpointer goroutine.
	pending   []PendingTxn // pre-committed, not known committed, barrier order
	opened    []time.Time  // when each pending transaction began
	committed map[string]int64
	uploaded  map[string]FileRef // shareable local files already in storage
	retained  []*Checkpoint      // newest first
	prefix    string             // names this incarnation's shared files
	failures  int
}

// newCheckpointer starts from the checkpoints the takeover left: the one the
// task runs from, then the older retained ones, newest first. The local
// cache is pruned to the files of the retained ones.
func newCheckpointer(t *Task, retained []*Checkpoint, cancel context.CancelFunc) *checkpointer {
	from := retained[0]
	var b [4]byte
	_, _ = rand.Read(b[:])
	cp := &checkpointer{
		t:             t,
		jobs:          make(chan *checkpointJob, t.cfg.Settings.MaxPending+1),
		fatal:         make(chan error, 1),
		savepointDone: make(chan savepointResult, t.cfg.Settings.MaxPending+2),
		idle:          make(chan struct{}, 1),
		done:          make(chan struct{}),
		cancel:        cancel,
		committed:     maps.Clone(from.CommittedOffsets),
		uploaded:      map[string]FileRef{},
		retained:      retained[:min(len(retained), t.cfg.Settings.Retained)],
		prefix:        hex.EncodeToString(b[:]),
	}
	for _, f := range from.Files {
		if t.cfg.State.Shareable(f.Name) {
			cp.uploaded[f.Name] = f
		}
	}
	t.cache.prune(cp.retained)
	return cp
}

func (cp *checkpointer) run(ctx context.Context) {
	defer close(cp.done)
	for {
		select {
		case <-ctx.Done():
			return
		case job := <-cp.jobs:
			err := cp.complete(ctx, job)
			if job.savepoint != nil && !job.savepointReported {
				cp.reportSavepoint(ctx, job, errors.New("its checkpoint did not complete"))
			}
			cp.outstanding.Add(-1)
			select {
			case cp.idle <- struct{}{}:
			default:
			}
			if err != nil {
				cp.fatal <- err
				return
			}
		}
	}
}

// stop ends the goroutine and waits for it.
func (cp *checkpointer) stop() {
	cp.cancel()
	<-cp.done
}

func (cp *checkpointer) submit(ctx context.Context, job *checkpointJob) error {
	cp.outstanding.Add(1)
	select {
	case cp.jobs <- job:
		return nil
	case err := <-cp.fatal:
		return err
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// waitIdle waits until every submitted checkpoint is finished.
func (cp *checkpointer) waitIdle(ctx context.Context) error {
	for cp.outstanding.Load() > 0 {
		select {
		case <-cp.idle:
		case err := <-cp.fatal:
			return err
		case <-ctx.Done():
			return context.Cause(ctx) // says which bound of a stop ran out
		}
	}
	return nil
}

// complete runs the asynchronous part of one checkpoint. A returned error is
// fatal for the task; a checkpoint that merely fails is counted and dropped,
// its transaction stays pending for the next one.
func (cp *checkpointer) complete(ctx context.Context, job *checkpointJob) error {
	t := cp.t
	task := t.cfg.Task
	ctx, cancel := context.WithTimeout(ctx, t.cfg.Settings.Timeout)
	defer cancel()

	// The sealed buffer must reach the backend whatever happens next: later
	// checkpoints build on it.
	dir := t.localCheckpointDir(job.id)
	var files []string
	var err error
	if job.retry {
		// No checkpoint is in flight and no barrier can be taken: the
		// backend is at the failed checkpoint's barrier.
		files, err = t.store.Backend().Checkpoint(dir)
	} else {
		files, err = t.store.Persist(job.sealed, dir)
	}
	if err != nil {
		return fmt.Errorf("snapshot state of checkpoint %d of task %d: %w", job.id, task, err)
	}
	defer os.RemoveAll(dir)

	if !job.retry {
		c, err := job.pre.Wait(ctx)
		if err != nil {
			// A transaction with a failed write can never be committed.
			return fmt.Errorf("flush sink of checkpoint %d of task %d: %w", job.id, task, err)
		}
		if c == nil {
			defer t.pendingCount.Add(-1) // nothing to commit later
		} else {
			cp.pending = append(cp.pending, PendingTxn{CheckpointID: job.id, Offsets: job.offsets, Committable: *c})
			cp.opened = append(cp.opened, job.txnOpened)
		}
	}
	if err := t.step(StepPreCommitted, job.id); err != nil {
		return err
	}

	refs, uploadedBytes, err := cp.upload(ctx, job.id, dir, files)
	if err != nil {
		return cp.failed(job, err)
	}
	if err := t.step(StepUploaded, job.id); err != nil {
		return err
	}

	if tt := t.cfg.Settings.TransactionTimeout; tt > 0 && len(cp.opened) > 0 {
		if age := time.Since(cp.opened[0]); age > tt-t.cfg.Settings.guardMargin() {
			t.st.CheckpointsFailed.Add(1)
			cp.record(job, "failed", errors.New("transaction-timeout guard"), nil)
			t.log.Error("CHECKPOINT FAILED by the transaction-timeout guard: its oldest pending transaction could be aborted by the broker before the commit; restarting the task from its newest complete checkpoint",
				"checkpoint", job.id, "oldest_pending", cp.pending[0].CheckpointID, "age", age.Round(time.Millisecond), "transaction_timeout", tt)
			return fmt.Errorf("checkpoint %d of task %d: pending transaction of checkpoint %d is %s old, too close to the transaction timeout %s",
				job.id, task, cp.pending[0].CheckpointID, age.Round(time.Millisecond), tt)
		}
	}

	meta := &Checkpoint{
		Job: t.job, Task: task, ID: job.id, Kind: KindCheckpoint, Owner: t.cfg.Owner,
		CreatedAt: time.Now().UTC(), Offsets: job.offsets, Files: refs,
		Pending: append([]PendingTxn(nil), cp.pending...), CommittedOffsets: cp.committed,
		RestoredFrom: t.restoredFrom,
	}
	if job.savepoint != nil && job.savepoint.Stop {
		meta.StoppedBy = job.savepoint.ID
	}
	// The create itself must finish before the oldest pending transaction
	// could time out, or the checkpoint would complete with it aborted.
	createCtx, cancelCreate := ctx, context.CancelFunc(func() {})
	if tt := t.cfg.Settings.TransactionTimeout; tt > 0 && len(cp.opened) > 0 {
		createCtx, cancelCreate = context.WithDeadline(ctx, cp.opened[0].Add(tt-t.cfg.Settings.guardMargin()))
	}
	err = t.createMetadata(createCtx, meta)
	cancelCreate()
	if err != nil {
		if errors.Is(err, ErrTakenOver) {
			return err
		}
		return cp.failed(job, err)
	}
	if err := cp.checkNotTakenOver(ctx, job.id); err != nil {
		if errors.Is(err, ErrTakenOver) {
			return err
		}
		// Complete, but not known to be ours: commit nothing now; the
		// transactions stay pending for the next checkpoint (or owner).
		return cp.failed(job, err)
	}
	if err := t.step(StepMetadataCreated, job.id); err != nil {
		return err
	}

	// Commit in checkpoint order, so the committed transactions of a task
	// are always a prefix.
	commitStart := time.Now()
	for len(cp.pending) > 0 {
		p := cp.pending[0]
		if err := t.writer.Commit(ctx, []sink.Committable{p.Committable}); err != nil {
			return fmt.Errorf("commit transaction of checkpoint %d of task %d: %w", p.CheckpointID, task, err)
		}
		cp.pending, cp.opened = cp.pending[1:], cp.opened[1:]
		cp.committed = maxOffsets(cp.committed, p.Offsets)
		t.pendingCount.Add(-1)
		if err := t.step(StepTxnCommitted, p.CheckpointID); err != nil {
			return err
		}
	}
	if err := t.step(StepCommitted, job.id); err != nil {
		return err
	}
	commitLatency := time.Since(commitStart)
	cp.failures = 0
	cp.lastFailed.Store(nil)
	elapsed := time.Since(job.barrier)
	t.st.CheckpointsCompleted.Add(1)
	t.st.LastCheckpointID.Store(job.id)
	t.st.LastCheckpointNanos.Store(int64(elapsed))
	t.lastDone.Store(time.Now().UnixNano())
	var size int64
	for _, r := range refs {
		size += r.Size
	}
	cp.record(job, "completed", nil, func(r *CheckpointRecord) {
		r.FullBytes, r.UploadedBytes, r.CommitLatency = size, uploadedBytes, commitLatency
	})
	t.log.Info("checkpoint completed", "checkpoint", job.id, "duration", elapsed.Round(time.Microsecond),
		"full_bytes", size, "uploaded_bytes", uploadedBytes, "offsets", job.offsets)

	if t.cfg.Settings.CommitOffsets {
		if err := t.cfg.Input.CommitOffsets(ctx, task, job.offsets); err != nil {
			t.log.Warn("offsets not committed to the consumer group (monitoring only)", "checkpoint", job.id, "err", err)
		}
	}
	if job.savepoint != nil {
		cp.writeSavepoint(ctx, job, dir)
	}
	cp.retain(ctx, meta)
	return nil
}

// writeSavepoint writes the task's part of a savepoint from the checkpoint's
// local snapshot in dir, after the checkpoint's transactions are committed:
// a restore from the savepoint then never rebuilds on uncommitted output.
func (cp *checkpointer) writeSavepoint(ctx context.Context, job *checkpointJob, dir string) {
	t := cp.t
	r := job.savepoint
	part := SavepointPart{Job: t.job, SavepointID: r.ID, Task: t.cfg.Task, Partitions: t.cfg.Partitions, CheckpointID: job.id, Offsets: job.offsets}
	err := t.writePart(ctx, *r, part, func(fn func(key, value []byte) error) error {
		b, err := t.cfg.State.Open(dir)
		if err != nil {
			return err
		}
		defer b.Close()
		return b.Scan(nil, fn)
	})
	cp.reportSavepoint(ctx, job, err)
}

func (cp *checkpointer) reportSavepoint(ctx context.Context, job *checkpointJob, err error) {
	job.savepointReported = true
	select {
	case cp.savepointDone <- savepointResult{id: job.savepoint.ID, err: err}:
	case <-ctx.Done():
	}
}

// checkNotTakenOver runs after this owner created the metadata of
// checkpoint id. Create-if-absent only proves the slot was free: a new owner
// claims the slot after the newest complete checkpoint, which is below id
// when this owner's checkpoints in between failed, and the new owner's
// retention frees its claimed slot again after a few checkpoints. Either
// way the new owner's checkpoints newer than this owner's previous complete
// one are in storage now (retention always keeps the newest), and this
// owner wrote none of them (its failed checkpoints left no metadata): any
// such checkpoint other than id means the task was taken over. Then this
// owner withdraws its metadata (the new owner would otherwise find the slot
// taken when it gets there) and stops before committing anything.
func (cp *checkpointer) checkNotTakenOver(ctx context.Context, id int64) error {
	t := cp.t
	prev := cp.retained[0].ID // this owner's newest complete checkpoint
	ids, err := ListCheckpointIDs(ctx, t.cfg.Storage, t.job, t.cfg.Task)
	if err != nil {
		return fmt.Errorf("checkpoint %d of task %d: check ownership: %w", id, t.cfg.Task, err)
	}
	for _, other := range ids {
		if other > prev && other != id {
			if err := t.cfg.Storage.Delete(ctx, MetadataName(t.job, t.cfg.Task, id)); err != nil {
				t.log.Warn("could not withdraw the metadata of a checkpoint completed after a takeover; the new owner's retention deletes it", "checkpoint", id, "err", err)
			}
			return fmt.Errorf("checkpoint %d of task %d: checkpoint %d exists, written by another owner since this one's checkpoint %d: %w",
				id, t.cfg.Task, other, prev, ErrTakenOver)
		}
	}
	return nil
}

// failed counts a failed checkpoint; past the tolerable number of
// consecutive failures the task restarts from its newest complete checkpoint.
func (cp *checkpointer) failed(job *checkpointJob, err error) error {
	t := cp.t
	cp.failures++
	t.st.CheckpointsFailed.Add(1)
	cp.lastFailed.Store(job)
	cp.record(job, "failed", err, nil)
	t.log.Warn("checkpoint failed; its transaction stays pending for the next one", "checkpoint", job.id, "consecutive_failures", cp.failures, "err", err)
	if cp.failures > t.cfg.Settings.TolerableFailures {
		return fmt.Errorf("checkpoint %d of task %d: %d consecutive checkpoints failed: %w", job.id, t.cfg.Task, cp.failures, err)
	}
	return nil
}

// record adds the checkpoint to the task's history and reports it; fill,
// if set, adds what only a completed checkpoint knows.
func (cp *checkpointer) record(job *checkpointJob, status string, err error, fill func(*CheckpointRecord)) {
	r := CheckpointRecord{
		Task: cp.t.cfg.Task, ID: job.id, Status: status, Barrier: job.barrier, SyncPause: job.syncPause,
		Duration: time.Since(job.barrier), Offsets: job.offsets,
	}
	if err != nil {
		r.Error = err.Error()
	}
	if fill != nil {
		fill(&r)
	}
	cp.t.st.history.add(r)
	if cp.t.st.observe != nil {
		cp.t.st.observe(r)
	}
}

// upload stores the snapshot files: shareable files only once (incremental),
// the rest in the checkpoint's own folder.
func (cp *checkpointer) upload(ctx context.Context, id int64, dir string, files []string) ([]FileRef, int64, error) {
	t := cp.t
	refs := make([]FileRef, 0, len(files))
	seen := make(map[string]FileRef, len(files))
	var uploadedBytes int64
	for _, name := range files {
		path := filepath.Join(dir, name)
		fi, err := os.Stat(path)
		if err != nil {
			return nil, 0, fmt.Errorf("checkpoint %d of task %d: %w", id, t.cfg.Task, err)
		}
		shareable := t.cfg.State.Shareable(name)
		if ref, ok := cp.uploaded[name]; ok && shareable && ref.Size == fi.Size() {
			refs = append(refs, ref)
			seen[name] = ref
			continue
		}
		ref := FileRef{Name: name, Size: fi.Size(), Object: fmt.Sprintf("chk-%d/%s", id, name)}
		if shareable {
			ref.Object = sharedDir + cp.prefix + "-" + name
		}
		if err := UploadFile(ctx, t.cfg.Storage, FileObjectName(t.job, t.cfg.Task, ref), path); err != nil {
			return nil, 0, fmt.Errorf("upload checkpoint %d of task %d: %w", id, t.cfg.Task, err)
		}
		uploadedBytes += ref.Size
		refs = append(refs, ref)
		if shareable {
			seen[name] = ref
			t.cache.add(ref, path) // a restore here links it instead of downloading it
		}
	}
	cp.uploaded = seen
	return refs, uploadedBytes, nil
}

// retain keeps the newest Retained checkpoints and deletes the rest with the
// files no kept checkpoint references, in storage and in the local cache. The newest checkpoint is fully
// committed here, so it is also the one a lost transaction would roll back
// to: retention never deletes it.
func (cp *checkpointer) retain(ctx context.Context, newest *Checkpoint) {
	t := cp.t
	cp.retained = append([]*Checkpoint{newest}, cp.retained...)
	if n := t.cfg.Settings.Retained; len(cp.retained) > n {
		cp.retained = cp.retained[:n]
	}
	if err := Retain(ctx, t.cfg.Storage, t.job, t.cfg.Task, cp.retained); err != nil {
		t.log.Warn("retention incomplete; it is retried after the next checkpoint", "err", err)
	}
	t.cache.prune(cp.retained)
}
