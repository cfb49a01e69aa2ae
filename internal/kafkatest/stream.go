package kafkatest

import (
	"context"
	"maps"
	"strconv"
	"sync"
	"testing"

	"github.com/twmb/franz-go/pkg/kgo"
)

// Stream produces keyed input a batch at a time, as a live source would,
// and keeps the true count of every key. Its keys are Key(p, i) with i
// counting the records of partition p, as ProduceKeyed makes them. It is
// safe for concurrent use, so a test can produce from a goroutine while it
// reads Want and Total.
type Stream struct {
	cl         *kgo.Client
	partitions int32

	mu   sync.Mutex
	next []int
	want map[string]int64
}

// NewStream returns a stream into topic, whose client is closed with the
// test.
func NewStream(t testing.TB, addr, topic string, partitions int32) *Stream {
	t.Helper()
	return &Stream{
		cl:         Client(t, addr, kgo.RecordPartitioner(kgo.ManualPartitioner()), kgo.DefaultProduceTopic(topic)),
		partitions: partitions,
		next:       make([]int, partitions),
		want:       map[string]int64{},
	}
}

// Produce appends n records to every partition and waits until the broker
// acknowledged them. Only acknowledged records count in Want.
func (s *Stream) Produce(ctx context.Context, n int) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	recs := make([]*kgo.Record, 0, n*int(s.partitions))
	for p := range s.partitions {
		for i := s.next[p]; i < s.next[p]+n; i++ {
			recs = append(recs, &kgo.Record{Partition: p, Key: []byte(Key(p, i)), Value: []byte(strconv.Itoa(i))})
		}
	}
	if err := s.cl.ProduceSync(ctx, recs...).FirstErr(); err != nil {
		return err
	}
	for _, r := range recs {
		s.want[string(r.Key)]++
	}
	for p := range s.next {
		s.next[p] += n
	}
	return nil
}

// Want returns how many records each key got so far.
func (s *Stream) Want() map[string]int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.want)
}

// Total returns how many records were produced so far.
func (s *Stream) Total() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.next {
		n += c
	}
	return n
}
