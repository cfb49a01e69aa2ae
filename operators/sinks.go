package operators

import (
	"fmt"

	"github.com/twmb/franz-go/pkg/kgo"
)

// ToKafka writes every record of s to topic, encoded by ser. The records go
// to the task's sink.Writer, so they are part of the task's checkpointed
// transaction and become visible to read_committed readers exactly once. The
// producer picks the partition from the key (franz-go's default partitioner).
// An error from ser fails the task with a *RecordError naming the input
// record.
func ToKafka[T any](s Stream[T], topic string, ser func(T) (key, value []byte, err error)) {
	j := s.n.job
	where := caller("operators.ToKafka")
	if err := checkName("output topic", topic); err != nil {
		j.fail(fmt.Errorf("%s: %w", where, err))
	}
	if ser == nil {
		j.fail(fmt.Errorf("%s: nil serializer", where))
	}
	j.outputs = append(j.outputs, topic)
	s.n.consume(func(b *builder) (func(T) error, error) {
		out := b.env.Out
		return func(v T) error {
			key, value, err := ser(v)
			if err != nil {
				return fmt.Errorf("serialize for topic %q: %w", topic, err)
			}
			// A new record each time: the writer keeps it until the broker
			// acknowledges it.
			out.Write(&kgo.Record{Topic: topic, Key: key, Value: value})
			return nil
		}, nil
	})
}
