package operators

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strconv"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/sluice-stream/sluice/sink"
	"github.com/sluice-stream/sluice/state"
)

// Header keys of a dead-lettered record, next to the record's own headers.
const (
	HeaderError     = "sluice.error"     // the deserializer's error message
	HeaderTopic     = "sluice.topic"     // the input topic of the record
	HeaderPartition = "sluice.partition" // its partition, in decimal
	HeaderOffset    = "sluice.offset"    // its offset, in decimal
)

// TaskEnv is what the runtime gives the operator chain of one task.
type TaskEnv struct {
	// Task is the task's partition index in the job's input topics.
	Task int32
	// Store holds the task's operator state. It may be nil only when the job
	// has no stateful operator.
	Store *state.Store
	// Out is the task's sink writer: every output and dead-letter record of
	// the task goes into its current transaction.
	Out sink.Writer
	// Log receives the chain's diagnostics; nil discards them.
	Log *slog.Logger
}

// Chain processes one input record of the task through every operator of the
// job, synchronously: when it returns, everything the record caused has been
// handed to the sink writer and to the state store, so the runtime may place
// a checkpoint barrier before the next call. A non-nil error is a
// *RecordError; the task must stop and restart from its last checkpoint.
// A Chain belongs to the task goroutine and must not be called concurrently.
// Operators may keep r and its buffers beyond the call (the sink writer holds
// output records until the broker acknowledges them), so the runtime must not
// reuse a record once it has passed it to the chain.
type Chain func(r *kgo.Record) error

// RecordError is the failure of a Chain on one input record.
type RecordError struct {
	// Topic, Partition and Offset locate the input record.
	Topic     string
	Partition int32
	Offset    int64
	// Err is the cause: a deserializer's, an operator's, a serializer's.
	Err error
}

// Error names the record so that the bad input can be found and inspected.
func (e *RecordError) Error() string {
	return fmt.Sprintf("record %s/%d at offset %d: %v", e.Topic, e.Partition, e.Offset, e.Err)
}

// Unwrap returns the cause.
func (e *RecordError) Unwrap() error { return e.Err }

// builder carries one Build call's task environment to the factories of the
// graph's operators.
type builder struct {
	job  *Job
	env  TaskEnv
	log  *slog.Logger
	dead int64 // dead letters of this task, to log the first one loudly
	// built memoizes each stream's per-task push function by node id.
	built map[int]any
}

// inputRoute is the chain's entry for one input topic.
type inputRoute struct {
	topic string
	push  func(*kgo.Record) error
}

// Build instantiates the job's operators for one task and returns its chain.
// Each call creates fresh operator instances, so the runtime calls it again
// after restoring the task's state into env.Store.
func (j *Job) Build(env TaskEnv) (Chain, error) {
	if err := j.Validate(); err != nil {
		return nil, err
	}
	if env.Out == nil {
		return nil, fmt.Errorf("job %q task %d: no sink writer", j.name, env.Task)
	}
	log := env.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	b := &builder{
		job:   j,
		env:   env,
		log:   log.With("job", j.name, "task", env.Task),
		built: make(map[int]any, len(j.streams)),
	}
	// A slice scanned by topic, not a map: jobs read one to a few topics, and
	// comparing a short string is cheaper than hashing it.
	var routes []inputRoute
	for _, src := range j.sources {
		push, err := src.build(b)
		if err != nil {
			return nil, fmt.Errorf("job %q task %d: %w", j.name, env.Task, err)
		}
		i := slices.IndexFunc(routes, func(r inputRoute) bool { return r.topic == src.topic })
		if i < 0 {
			routes = append(routes, inputRoute{topic: src.topic, push: push})
			continue
		}
		// Two sources of one topic: each sees every record.
		first := routes[i].push
		routes[i].push = func(r *kgo.Record) error {
			if err := first(r); err != nil {
				return err
			}
			return push(r)
		}
	}
	return func(r *kgo.Record) error {
		for i := range routes {
			if routes[i].topic == r.Topic {
				if err := routes[i].push(r); err != nil {
					return &RecordError{Topic: r.Topic, Partition: r.Partition, Offset: r.Offset, Err: err}
				}
				return nil
			}
		}
		return &RecordError{Topic: r.Topic, Partition: r.Partition, Offset: r.Offset,
			Err: fmt.Errorf("topic %q is not an input of job %q", r.Topic, j.name)}
	}, nil
}

// badRecord applies the job's ErrorPolicy to a record its deserializer
// rejected with cause.
func (b *builder) badRecord(r *kgo.Record, cause error) error {
	topic := b.job.deadLetter
	if topic == "" {
		return fmt.Errorf("deserialize: %w", cause)
	}
	headers := make([]kgo.RecordHeader, 0, len(r.Headers)+4)
	headers = append(headers, r.Headers...)
	headers = append(headers,
		kgo.RecordHeader{Key: HeaderError, Value: []byte(cause.Error())},
		kgo.RecordHeader{Key: HeaderTopic, Value: []byte(r.Topic)},
		kgo.RecordHeader{Key: HeaderPartition, Value: strconv.AppendInt(nil, int64(r.Partition), 10)},
		kgo.RecordHeader{Key: HeaderOffset, Value: strconv.AppendInt(nil, r.Offset, 10)},
	)
	b.env.Out.Write(&kgo.Record{Topic: topic, Key: r.Key, Value: r.Value, Headers: headers})
	b.job.deadLetters.Add(1)
	b.dead++
	// The first dead letter of a task is worth a warning; a flood of them is
	// not worth a flood of logs (the counter tells how many).
	level := slog.LevelDebug
	if b.dead == 1 {
		level = slog.LevelWarn
	}
	b.log.Log(context.Background(), level, "record sent to dead-letter topic",
		"dead_letter_topic", topic, "topic", r.Topic, "partition", r.Partition, "offset", r.Offset, "error", cause)
	return nil
}
