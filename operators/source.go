package operators

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// Deserializer turns an input record into the source stream's type. An error
// means the record is bad input: the job's ErrorPolicy (OnDeserializeError)
// decides whether the task fails or dead-letters the record and goes on.
type Deserializer[T any] func(r *kgo.Record) (T, error)

// source is one FromKafka: its topic and the factory of the per-task
// function that deserializes a record and pushes it downstream.
type source struct {
	topic string
	build func(*builder) (func(*kgo.Record) error, error)
}

// FromKafka adds a source that reads topic and decodes each record with d.
//
// A job may have several sources: partition p of every input topic belongs to
// task p, so the inputs must be co-partitioned (same partition count, same
// partitioning of keys) for records of one key to meet in one task. Two
// sources may read the same topic; each then sees every record.
func FromKafka[T any](j *Job, topic string, d Deserializer[T]) Stream[T] {
	out := newNode[T](j, caller("operators.FromKafka"))
	if err := checkName("input topic", topic); err != nil {
		j.fail(fmt.Errorf("%s: %w", out.from, err))
	}
	if d == nil {
		j.fail(fmt.Errorf("%s: nil deserializer", out.from))
	}
	j.sources = append(j.sources, source{topic: topic, build: func(b *builder) (func(*kgo.Record) error, error) {
		next, err := out.build(b)
		if err != nil {
			return nil, err
		}
		return func(r *kgo.Record) error {
			v, err := d(r)
			if err != nil {
				return b.badRecord(r, err)
			}
			return next(v)
		}, nil
	}})
	return Stream[T]{out}
}

// Raw passes the record itself on: for jobs that need headers or want to
// decode lazily. Keeping the record is safe (see Chain).
func Raw(r *kgo.Record) (*kgo.Record, error) { return r, nil }

// Message is an input record with its key and value as strings.
type Message struct {
	// Topic, Partition and Offset locate the record; after a Merge they
	// tell the inputs apart.
	Topic     string
	Partition int32
	Offset    int64
	// Timestamp is the record's Kafka timestamp.
	Timestamp time.Time
	Key       string
	Value     string
}

// Strings decodes a record into a Message. It never fails: Go strings may
// hold any bytes.
func Strings(r *kgo.Record) (Message, error) {
	return Message{
		Topic:     r.Topic,
		Partition: r.Partition,
		Offset:    r.Offset,
		Timestamp: r.Timestamp,
		Key:       string(r.Key),
		Value:     string(r.Value),
	}, nil
}

// JSON returns a Deserializer that decodes the record's value as JSON into a
// T. A value that is not valid JSON for T is bad input (see ErrorPolicy).
func JSON[T any]() Deserializer[T] {
	return func(r *kgo.Record) (T, error) {
		var v T
		if err := json.Unmarshal(r.Value, &v); err != nil {
			var zero T // not the half-decoded v
			return zero, fmt.Errorf("decode JSON value: %w", err)
		}
		return v, nil
	}
}
