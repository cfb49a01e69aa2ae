// Package sink owns Sluice's output side: the two-phase-commit contract that a
// task's checkpoints drive, the exactly-once Kafka transactional sink, and the
// weaker at-least-once, no-guarantee and stdout sinks.
//
// A job has one Writer per task whatever the number of output topics: every
// record a task emits between two barriers goes into one transaction, so one
// committable per checkpoint describes all of the task's output.
package sink

import (
	"context"
	"errors"

	"github.com/twmb/franz-go/pkg/kgo"
)

// Committable is what a two-phase-commit sink needs to finish a pre-committed
// transaction later, possibly in another process: for Kafka the transactional
// id with the producer id and epoch the broker last answered, and where the
// transaction's progress marker was written (see Outcome).
type Committable struct {
	// CheckpointID is the checkpoint whose barrier closed this transaction.
	CheckpointID int64 `json:"checkpoint_id"`
	// TransactionalID is the Kafka transactional id of the pool slot used.
	TransactionalID string `json:"transactional_id"`
	// ProducerID and Epoch are as the broker last answered them during the
	// transaction (with transaction protocol v2 the epoch moves every EndTxn).
	ProducerID int64 `json:"producer_id"`
	Epoch      int16 `json:"epoch"`
	// Marker locates the progress marker {task, checkpoint id} written in the
	// same transaction: it is visible to a read_committed reader exactly when
	// the transaction committed.
	Marker MarkerRef `json:"marker"`
}

// MarkerRef is the position of a progress marker record.
type MarkerRef struct {
	Topic     string `json:"topic"`
	Partition int32  `json:"partition"`
	Offset    int64  `json:"offset"`
}

// Outcome is what became of a pre-committed transaction.
type Outcome int

const (
	// Committed: the transaction's records are visible to read_committed readers.
	Committed Outcome = iota + 1
	// Lost: the transaction was aborted (broker timeout, broker crash, fencing)
	// and its records will never be visible. Its input must be replayed.
	Lost
)

func (o Outcome) String() string {
	switch o {
	case Committed:
		return "committed"
	case Lost:
		return "lost"
	}
	return "unknown"
}

// ErrFenced means another owner took over the transactional ids of this
// task: the writer must stop and never commit again.
var ErrFenced = errors.New("sink: producer fenced by a newer owner")

// Writer is the part of a sink that lives in one task. Write is called from
// the task goroutine only; PreCommit too. Commit may run concurrently with
// Write (from the checkpoint's asynchronous part) and only touches
// transactions already pre-committed.
type Writer interface {
	// Write adds a record to the current transaction. It does not block for
	// the broker; a failed produce surfaces from the next PreCommit's wait.
	Write(r *kgo.Record)
	// PreCommit is the synchronous part of a barrier: it seals the current
	// transaction for checkpoint checkpointID and moves on to the next
	// transactional id of the pool at once, so the task keeps processing.
	// The returned PreCommitted finishes the flush asynchronously.
	PreCommit(ctx context.Context, checkpointID int64) (PreCommitted, error)
	// Commit commits pre-committed transactions in the given (checkpoint)
	// order, stopping at the first failure. It is called when the checkpoint
	// that lists them is complete. Committing an already committed
	// transaction is not an error.
	Commit(ctx context.Context, cs []Committable) error
	// Close releases the writer's clients. Open transactions are left open,
	// exactly like a crash: fencing by the next owner aborts them.
	Close()
}

// PreCommitted is a transaction sealed at a barrier whose flush may still be
// in flight.
type PreCommitted interface {
	// Wait blocks until every record of the transaction is acknowledged by the
	// broker and returns its committable; nil for sinks without transactions.
	Wait(ctx context.Context) (*Committable, error)
}

// Sink creates the writers of a job's tasks and recovers what a previous
// owner of a task left behind. The takeover protocol calls, in this order:
// Recover (commit the newest complete checkpoint's pending committables),
// then NewWriter (which fences the task's pool).
type Sink interface {
	// Recover commits committables recorded by a previous owner of task, in
	// order, by resuming their transactions. An ambiguous answer (fenced,
	// invalid state, timeout) is resolved by the progress marker. It returns
	// one outcome per committable; after the first Lost, later transactions
	// are not committed (they are reported Lost too: committing them would
	// leave a gap) and fencing by NewWriter aborts them.
	Recover(ctx context.Context, task int32, cs []Committable) ([]Outcome, error)
	// NewWriter creates the writer of task. For a transactional sink this
	// fences every transactional id of the task's pool (InitProducerID aborts
	// whatever a previous owner left open) and aborts lingering transactions
	// of the task outside today's pool.
	NewWriter(ctx context.Context, task int32) (Writer, error)
	// Close releases shared clients.
	Close()
}
