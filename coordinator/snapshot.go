package coordinator

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/sluice-stream/sluice/sink"
	"github.com/sluice-stream/sluice/state"
)

// Snapshot is a job's state as `run --from` and `state dump` read it: a
// savepoint, or a job's checkpoints (each task's newest readable one).
type Snapshot struct {
	// Job is the name of the job that wrote it.
	Job string
	// Kind is "savepoint" or "checkpoint".
	Kind string
	// Partitions is the job's number of tasks when it was written.
	Partitions int32
	// Location describes where it is, for messages.
	Location string

	offsets map[int32]map[string]int64
	scan    func(ctx context.Context, task int32, fn func(key, value []byte) error) error
	// pending are the transactions of the checkpoints read, by task; an
	// import makes sure they are committed (sink.Sink.Recover).
	pending map[int32][]PendingTxn
}

// Offsets returns the input position of a task of the snapshot.
func (s *Snapshot) Offsets(task int32) map[string]int64 { return maps.Clone(s.offsets[task]) }

// Scan calls fn with every state entry of a task of the snapshot, in key
// order (keys as made by state.StateKey).
func (s *Snapshot) Scan(ctx context.Context, task int32, fn func(key, value []byte) error) error {
	if task < 0 || task >= s.Partitions {
		return fmt.Errorf("snapshot %s has no task %d", s.Location, task)
	}
	return s.scan(ctx, task, fn)
}

// OpenSnapshot reads the snapshot at st: a savepoint if st holds a
// savepoint's _metadata, else a job's checkpoint folder ("<root>/<job>",
// holding tasks/<task>/chk-<id>/). Checkpoint state is downloaded into
// tmpDir and opened with f when scanned.
func OpenSnapshot(ctx context.Context, st Storage, f state.Factory, tmpDir string) (*Snapshot, error) {
	sp, err := LoadSavepoint(ctx, st)
	if err == nil {
		return savepointSnapshot(st, sp), nil
	}
	if !errors.Is(err, ErrNotFound) {
		return nil, err
	}
	return checkpointSnapshot(ctx, st, f, tmpDir)
}

func savepointSnapshot(st Storage, sp *Savepoint) *Snapshot {
	s := &Snapshot{Job: sp.Job, Kind: "savepoint", Partitions: sp.Partitions, Location: st.String(), offsets: map[int32]map[string]int64{}}
	for i := range sp.Parts {
		s.offsets[sp.Parts[i].Task] = sp.Parts[i].Offsets
	}
	s.scan = func(ctx context.Context, task int32, fn func(key, value []byte) error) error {
		return ScanSavepointState(ctx, st, &sp.Parts[task], fn)
	}
	return s
}

// checkpointSnapshot reads a job folder: st's names are "tasks/...", the
// job's checkpoints as LoadCheckpoint sees them under "<job>/tasks/...".
func checkpointSnapshot(ctx context.Context, st Storage, f state.Factory, tmpDir string) (*Snapshot, error) {
	names, err := st.List(ctx, "tasks/")
	if err != nil {
		return nil, fmt.Errorf("snapshot at %s: %w", st, err)
	}
	tasks := map[int32]bool{}
	var job string // named by the first readable metadata
	for _, name := range names {
		digits, rest, _ := strings.Cut(strings.TrimPrefix(name, "tasks/"), "/")
		t, err := strconv.ParseInt(digits, 10, 32)
		if err != nil || t < 0 {
			continue
		}
		tasks[int32(t)] = true
		if id, ok := ParseCheckpointDir(rest); job == "" && ok && rest == checkpointDir(id)+metadataFile {
			var c Checkpoint
			if readEnvelope(ctx, st, name, metadataFormat, metadataVersion, &c) == nil {
				job = c.Job
			}
		}
	}
	if len(tasks) == 0 {
		return nil, fmt.Errorf("%s holds neither a savepoint (_metadata) nor a job's checkpoints (tasks/<task>/chk-<id>/): %w", st, ErrNotFound)
	}
	if job == "" {
		return nil, fmt.Errorf("snapshot at %s: no readable checkpoint metadata", st)
	}
	// The folder as LoadCheckpoint sees a job under a checkpoint root.
	view := mount(st, job+"/")
	n := slices.Max(slices.Collect(maps.Keys(tasks))) + 1
	s := &Snapshot{Job: job, Kind: "checkpoint", Partitions: n, Location: st.String(), offsets: map[int32]map[string]int64{}, pending: map[int32][]PendingTxn{}}
	newest := make(map[int32]*Checkpoint, n)
	for task := range n {
		c, err := newestReadable(ctx, view, job, task)
		if err != nil {
			return nil, fmt.Errorf("snapshot at %s: %w", st, err)
		}
		newest[task] = c
		s.offsets[task] = c.Offsets
		s.pending[task] = c.Pending
	}
	s.scan = func(ctx context.Context, task int32, fn func(key, value []byte) error) error {
		dir, err := os.MkdirTemp(tmpDir, "snapshot-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		store, err := OpenCheckpointState(ctx, view, f, newest[task], filepath.Join(dir, "db"))
		if err != nil {
			return err
		}
		defer store.Close()
		return store.Scan(nil, fn)
	}
	return s, nil
}

// newestReadable returns a task's newest checkpoint whose metadata can be
// read, skipping corrupt ones as a takeover does.
func newestReadable(ctx context.Context, st Storage, job string, task int32) (*Checkpoint, error) {
	ids, err := ListCheckpointIDs(ctx, st, job, task)
	if err != nil {
		return nil, err
	}
	for _, id := range ids {
		c, err := LoadCheckpoint(ctx, st, job, task, id)
		if errors.Is(err, ErrCorruptMetadata) || errors.Is(err, ErrUnsupportedVersion) {
			continue
		}
		return c, err
	}
	return nil, fmt.Errorf("task %d has no readable checkpoint", task)
}

// importState builds the state and offsets of this task from a snapshot
// (run --from) and records them as an import checkpoint after from, so the
// task restores it next and a later takeover does not import again.
//
// With as many tasks as the snapshot, task t takes task t's state and
// offsets. With more, every key's state goes to the task Kafka's default
// partitioner now sends the key to, and new partitions start at the start
// position; fewer partitions cannot happen with Kafka and are refused.
func (t *Task) importState(ctx context.Context, from *Checkpoint) (*Checkpoint, error) {
	imp := t.cfg.Import
	task := t.cfg.Task
	fail := func(err error) (*Checkpoint, error) {
		return nil, fmt.Errorf("import task %d from %s: %w", task, imp.From, err)
	}
	if t.cfg.OpenLocation == nil {
		return fail(errors.New("no storage opener configured"))
	}
	st, err := t.cfg.OpenLocation(ctx, imp.From)
	if err != nil {
		return fail(err)
	}
	tmp := filepath.Join(t.cfg.WorkDir, "import")
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return fail(err)
	}
	defer os.RemoveAll(tmp)
	snap, err := OpenSnapshot(ctx, st, t.cfg.State, tmp)
	if err != nil {
		return fail(err)
	}
	n := imp.Partitions
	if snap.Partitions > n {
		return fail(fmt.Errorf("the %s has %d tasks and the input now %d partitions; Kafka cannot lose partitions, so its offsets cannot be mapped", snap.Kind, snap.Partitions, n))
	}
	// The import must never build on output that could still be aborted.
	sources := []int32{task}
	if snap.Partitions != n {
		sources = make([]int32, snap.Partitions)
		for i := range sources {
			sources[i] = int32(i)
		}
	}
	for _, s := range sources {
		if err := t.commitSnapshotPending(ctx, snap, s); err != nil {
			return fail(err)
		}
	}

	offsets, err := t.cfg.Input.StartOffsets(ctx, task)
	if err != nil {
		return fail(err)
	}
	if task < snap.Partitions {
		maps.Copy(offsets, snap.Offsets(task))
	}
	known := make(map[string]bool)
	for _, op := range t.cfg.Job.Operators() {
		known[op] = true
	}
	db, err := t.cfg.State.Open(filepath.Join(tmp, "db"))
	if err != nil {
		return fail(err)
	}
	defer db.Close()
	var batch state.Batch
	var entries, dropped int64
	flush := func() error {
		if batch.Len() == 0 {
			return nil
		}
		err := db.Apply(&batch)
		batch = state.Batch{}
		return err
	}
	for _, s := range sources {
		err := snap.Scan(ctx, s, func(key, value []byte) error {
			op, _, recordKey, _, err := state.ParseStateKey(key)
			if err != nil {
				return err
			}
			if snap.Partitions != n && KafkaPartition(recordKey, n) != task {
				return nil
			}
			if !known[op] {
				if !imp.AllowNonRestoredState {
					return fmt.Errorf("%w: state of operator %q has no operator with that uid in this job (start with --allow-non-restored-state to drop it)", ErrNonRestoredState, op)
				}
				dropped++
				return nil
			}
			batch.Put(key, value)
			entries++
			if batch.Len() >= 4096 {
				return flush()
			}
			return nil
		})
		if err != nil {
			return fail(fmt.Errorf("task %d of the %s: %w", s, snap.Kind, err))
		}
	}
	if err := flush(); err != nil {
		return fail(err)
	}
	id := from.ID + 1
	dir := filepath.Join(tmp, "chk")
	files, err := db.Checkpoint(dir)
	if err != nil {
		return fail(err)
	}
	c := &Checkpoint{
		Job: t.job, Task: task, ID: id, Kind: KindImport, Owner: t.cfg.Owner, CreatedAt: time.Now().UTC(),
		Offsets: offsets, CommittedOffsets: maps.Clone(offsets), RestoredFrom: imp.From,
	}
	for _, name := range files {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			return fail(err)
		}
		ref := FileRef{Name: name, Size: fi.Size(), Object: fmt.Sprintf("chk-%d/%s", id, name)}
		if err := UploadFile(ctx, t.cfg.Storage, FileObjectName(t.job, task, ref), filepath.Join(dir, name)); err != nil {
			return fail(err)
		}
		c.Files = append(c.Files, ref)
	}
	if err := t.createMetadata(ctx, c); err != nil {
		return fail(err)
	}
	t.log.Info("task imported", "from", imp.From, "kind", snap.Kind, "snapshot_tasks", snap.Partitions, "tasks", n,
		"entries", entries, "dropped_entries", dropped, "offsets", offsets, "checkpoint", id)
	return c, nil
}

// ErrNonRestoredState: a snapshot holds state of an operator the job does not
// have, and the job was not started with --allow-non-restored-state.
var ErrNonRestoredState = errors.New("state not restored")

// commitSnapshotPending makes sure the transactions of a snapshot task's
// checkpoint are committed before its state is imported (a checkpoint's own
// transaction is committed after its metadata is written). Each outcome is
// decided by its progress marker, so importing tasks racing on the same
// transactions agree; a lost one makes that checkpoint unusable.
func (t *Task) commitSnapshotPending(ctx context.Context, snap *Snapshot, task int32) error {
	pending := snap.pending[task]
	if len(pending) == 0 {
		return nil
	}
	cs := make([]sink.Committable, len(pending))
	for i, p := range pending {
		cs[i] = p.Committable
	}
	outcomes, err := t.cfg.Sink.Recover(ctx, task, cs)
	if err != nil {
		return fmt.Errorf("commit transactions of task %d of the checkpoint: %w", task, err)
	}
	for i, o := range outcomes {
		if o != sink.Committed {
			return fmt.Errorf("the transaction of checkpoint %d of task %d was lost at the broker: restore from a savepoint or an older job folder instead", pending[i].CheckpointID, task)
		}
	}
	return nil
}
