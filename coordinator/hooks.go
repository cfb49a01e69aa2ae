package coordinator

import "errors"

// Step names a point of the checkpoint and takeover protocol at which a test
// can inject a crash.
type Step string

// The protocol steps, in the order a checkpoint passes them.
const (
	// StepRecord: a record was processed (before the next one).
	StepRecord Step = "record"
	// StepBarrier: a barrier is due, before its synchronous part.
	StepBarrier Step = "barrier"
	// StepPreCommitted: the sink flushed the checkpoint's transaction and the
	// state snapshot exists locally; nothing is in storage yet.
	StepPreCommitted Step = "pre-committed"
	// StepUploaded: state files are in storage, the metadata is not.
	StepUploaded Step = "uploaded"
	// StepMetadataCreated: the checkpoint is complete, nothing committed.
	StepMetadataCreated Step = "metadata-created"
	// StepTxnCommitted: one pending transaction committed, maybe more to go.
	StepTxnCommitted Step = "txn-committed"
	// StepCommitted: every pending transaction committed, offsets not yet
	// committed to the consumer group.
	StepCommitted Step = "committed"
	// StepClaimed: takeover created its claim, nothing recovered yet.
	StepClaimed Step = "claimed"
	// StepRecoveryCommit: takeover resolved one of the previous owner's
	// pending transactions, maybe more to go.
	StepRecoveryCommit Step = "recovery-commit"
	// StepFenced: takeover fenced the task's transactional ids.
	StepFenced Step = "fenced"
)

// Hook is called at every protocol step when set. A non-nil error crashes the
// task right there: it stops without a final checkpoint, leaving open
// transactions and partial uploads behind exactly as a killed process would.
type Hook func(task int32, step Step, checkpointID int64) error

// ErrCrash is what test hooks return to crash a task.
var ErrCrash = errors.New("injected crash")
