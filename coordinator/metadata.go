package coordinator

import (
	"time"

	"github.com/sluice-stream/sluice/sink"
)

// Checkpoint is the metadata of one task's checkpoint, the content of
// chk-<id>/_metadata. Its successful create-if-absent is what makes the
// checkpoint complete.
type Checkpoint struct {
	Job  string `json:"job"`
	Task int32  `json:"task"`
	ID   int64  `json:"id"`
	// Kind says how the checkpoint came to be.
	Kind Kind `json:"kind"`
	// Owner identifies the task incarnation that wrote it.
	Owner     string    `json:"owner"`
	CreatedAt time.Time `json:"created_at"`
	// Offsets is the next offset to read of partition Task of each input
	// topic.
	Offsets map[string]int64 `json:"offsets"`
	// Files is the state snapshot: files in the task's shared/ folder
	// (immutable, referenced by several checkpoints) or in this checkpoint's
	// own folder.
	Files []FileRef `json:"files"`
	// Pending lists, in checkpoint order, the transactions not known to be
	// committed when this metadata was written: this checkpoint's own and
	// those of earlier checkpoints that failed or whose commit has not been
	// confirmed. Whoever finds this checkpoint complete commits them.
	Pending []PendingTxn `json:"pending,omitempty"`
	// CommittedOffsets is the input position (next offset per input topic)
	// below which the output of every record is known to be committed. It
	// equals Offsets once this checkpoint's transactions are committed. It is
	// ahead of Offsets only after a lost transaction made the task restore an
	// older state: the task then replays and suppresses the output of records
	// below it, so nothing is emitted twice.
	CommittedOffsets map[string]int64 `json:"committed_offsets"`
	// RestoredFrom is the savepoint or checkpoint location the task's state
	// was imported from (run --from), carried by every later checkpoint, so
	// an instance started again with the same --from does not import twice.
	RestoredFrom string `json:"restored_from,omitempty"`
	// StoppedBy is the id of the stop-with-savepoint request whose barrier
	// this checkpoint is: the task processed nothing after it. Instances
	// taking part in that stop leave such a task idle.
	StoppedBy string `json:"stopped_by,omitempty"`
}

// Kind says how a checkpoint came to be.
type Kind string

const (
	// KindCheckpoint is a periodic checkpoint taken at a barrier.
	KindCheckpoint Kind = "checkpoint"
	// KindClaim is written by a new owner taking over a task: it repeats the
	// previous checkpoint's state and offsets and keeps its pending
	// transactions, and by taking the next id it stops every earlier owner
	// from completing a checkpoint.
	KindClaim Kind = "claim"
	// KindImport is written by a takeover that imports the task's state and
	// offsets from a savepoint or another job's checkpoints (run --from).
	KindImport Kind = "import"
)

// PendingTxn is a pre-committed transaction with the input position of the
// barrier that closed it.
type PendingTxn struct {
	CheckpointID int64            `json:"checkpoint_id"`
	Offsets      map[string]int64 `json:"offsets"`
	Committable  sink.Committable `json:"committable"`
}

// FileRef is one file of a state snapshot.
type FileRef struct {
	// Name is the file's name in the backend's directory.
	Name string `json:"name"`
	// Object is its name in storage, relative to the task's folder
	// ("shared/<owner>-000012.sst" or "chk-12/MANIFEST-000001").
	Object string `json:"object"`
	Size   int64  `json:"size"`
}
