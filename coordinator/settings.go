package coordinator

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/sluice-stream/sluice/source"
)

// Settings are a job's checkpoint settings, named as Flink users know them.
type Settings struct {
	// Interval between two barriers of a task.
	Interval time.Duration
	// Timeout bounds the asynchronous part of one checkpoint.
	Timeout time.Duration
	// MinPause is the least time from one checkpoint's completion to the
	// next barrier.
	MinPause time.Duration
	// MaxPending is the most pre-committed transactions a task may have
	// waiting for their checkpoint to complete; the sink's pool of
	// transactional ids has MaxPending+1 ids. While it is reached, barriers
	// are skipped and the current transaction grows.
	MaxPending int
	// TolerableFailures is how many consecutive checkpoints may fail before
	// the task restarts from its newest complete checkpoint.
	TolerableFailures int
	// Retained is how many complete checkpoints are kept per task.
	Retained int
	// TransactionTimeout is the sink's transaction timeout; a checkpoint
	// whose oldest pending transaction could reach it before the commit
	// fails instead of completing. Zero disables the guard (no transactions).
	TransactionTimeout time.Duration
	// CommitOffsets commits checkpointed offsets to the consumer group after
	// each completed checkpoint, for lag monitoring.
	CommitOffsets bool
	// StopTimeout bounds the final checkpoint taken when a task stops.
	StopTimeout time.Duration
}

// DefaultSettings are the defaults of the command line.
func DefaultSettings() Settings {
	return Settings{
		Interval:          time.Second,
		Timeout:           2 * time.Minute,
		MaxPending:        2,
		TolerableFailures: 5,
		Retained:          3,
		CommitOffsets:     true,
		StopTimeout:       30 * time.Second,
	}
}

// Validate reports settings that cannot work.
func (s Settings) Validate() error {
	var errs []error
	if s.Interval <= 0 {
		errs = append(errs, fmt.Errorf("checkpoint interval must be positive, got %s", s.Interval))
	}
	if s.Timeout <= 0 {
		errs = append(errs, fmt.Errorf("checkpoint timeout must be positive, got %s", s.Timeout))
	}
	if s.MaxPending < 1 {
		errs = append(errs, fmt.Errorf("max pending checkpoints must be at least 1, got %d", s.MaxPending))
	}
	if s.Retained < 1 {
		errs = append(errs, fmt.Errorf("retained checkpoints must be at least 1, got %d", s.Retained))
	}
	if s.TolerableFailures < 0 {
		errs = append(errs, fmt.Errorf("tolerable checkpoint failures must not be negative, got %d", s.TolerableFailures))
	}
	return errors.Join(errs...)
}

// guardMargin is the time a commit is given after the metadata create: a
// checkpoint whose oldest pending transaction is older than the transaction
// timeout minus this margin fails.
func (s Settings) guardMargin() time.Duration {
	return max(s.TransactionTimeout/5, time.Second)
}

// Input is the part of the Kafka source a task uses; source.Source is the
// real one, tests use in-memory fakes.
type Input interface {
	// StartOffsets resolves the start position of a task without checkpoint.
	StartOffsets(ctx context.Context, task int32) (map[string]int64, error)
	// CheckAvailable fails with source.ErrInputGone if the broker no longer
	// has the input from offsets on.
	CheckAvailable(ctx context.Context, task int32, offsets map[string]int64) error
	// Open starts fetching the task's partitions at offsets.
	Open(ctx context.Context, task int32, offsets map[string]int64) (Feed, error)
	// CommitOffsets commits offsets to the consumer group (monitoring only).
	CommitOffsets(ctx context.Context, task int32, offsets map[string]int64) error
}

// Feed is one task's stream of input batches.
type Feed interface {
	Batches() <-chan source.Batch
	// Close stops fetching.
	Close(ctx context.Context) error
}

// KafkaInput adapts a source.Source to Input. With a consumer group, offsets
// are committed as a group member (a broker refuses other commits to a group
// with members).
type KafkaInput struct {
	*source.Source
	group atomic.Pointer[source.Membership]
}

// UseGroup makes CommitOffsets commit through the group membership.
func (k *KafkaInput) UseGroup(m *source.Membership) { k.group.Store(m) }

// CommitOffsets implements Input.
func (k *KafkaInput) CommitOffsets(ctx context.Context, task int32, offsets map[string]int64) error {
	if m := k.group.Load(); m != nil {
		return m.CommitOffsets(ctx, task, offsets)
	}
	return k.Source.CommitOffsets(ctx, task, offsets)
}

// Open implements Input.
func (k *KafkaInput) Open(ctx context.Context, task int32, offsets map[string]int64) (Feed, error) {
	in, err := k.Assign(ctx, task, offsets)
	if err != nil {
		return nil, err
	}
	return kafkaFeed{k.Source, in}, nil
}

type kafkaFeed struct {
	src *source.Source
	in  *source.Inbox
}

func (f kafkaFeed) Batches() <-chan source.Batch { return f.in.C }

func (f kafkaFeed) Close(ctx context.Context) error { return f.src.Release(ctx, f.in) }
