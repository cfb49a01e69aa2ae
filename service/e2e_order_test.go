package service_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/sluice-stream/sluice/internal/kafkatest"
)

// TestE2EKeyOrderAcrossTransactions checks, with no crash at all, that a
// separate read_committed reader sees every key's counts exactly once and
// in order, while barriers cut the output into many transactions on the
// sink's pool of producers.
//
// The records of consecutive checkpoints go through different producers
// (one per transactional id of the pool) and the barrier does not wait for
// the previous transaction's flush, so nothing orders the appends of two
// consecutive transactions to the same output partition.
//   - natural: a fresh pool (each slot's first produce needs a metadata
//     round trip) with 5 ms barriers reorders by itself in about half the
//     runs here;
//   - slow-producer: the broker holds the first produce of task 0's first
//     transaction (slot 0) until slot 1, the next checkpoint's producer,
//     has appended to the output topic (at most half a second): a network
//     hiccup. It reorders deterministically unless the sink keeps slot 1
//     from appending before slot 0's records are in.
func TestE2EKeyOrderAcrossTransactions(t *testing.T) {
	t.Run("natural", func(t *testing.T) {
		e := newE2EEnv(t, 4)
		runOrderScenario(t, e, 5*time.Millisecond)
	})
	t.Run("slow-producer", func(t *testing.T) {
		e := newE2EEnv(t, 1)
		outID := topicID(t, e.addr, e2eOutput)
		slot0, slot1 := "sluice-"+e2eJob+"-0-0", "sluice-"+e2eJob+"-0-1"
		slot1Appended := make(chan struct{})
		var held, released atomic.Bool
		e.cluster.ControlKey(int16(kmsg.Produce), func(req kmsg.Request) (kmsg.Response, error, bool) {
			e.cluster.KeepControl()
			pr := req.(*kmsg.ProduceRequest)
			if pr.TransactionID == nil || !producesTo(pr, e2eOutput, outID) {
				return nil, nil, false
			}
			switch id := *pr.TransactionID; {
			case id == slot0 && !held.Load():
				held.Store(true)
				// A network hiccup: resumed once the broker handled slot 1's
				// request, or after half a second if slot 1 waits for slot 0
				// (as a sink that orders its transactions' appends would).
				e.cluster.SleepControl(func() {
					select {
					case <-slot1Appended:
					case <-time.After(500 * time.Millisecond):
					}
				})
			case id == slot1 && held.Load() && !released.Load():
				released.Store(true)
				close(slot1Appended)
			}
			return nil, nil, false
		})
		runOrderScenario(t, e, 30*time.Millisecond)
		if !held.Load() {
			t.Fatal("the slow produce was not staged")
		}
	})
}

// producesTo reports whether a produce request writes to topic (named, or
// by id from produce v13 on).
func producesTo(pr *kmsg.ProduceRequest, topic string, id [16]byte) bool {
	for _, tp := range pr.Topics {
		if tp.Topic == topic || tp.TopicID == id {
			return true
		}
	}
	return false
}

func runOrderScenario(t *testing.T, e *e2eEnv, interval time.Duration) {
	c := e.config()
	c.Settings.Interval = interval
	j := e2eStart(t, c, e2eLogger(t))
	stream := kafkatest.NewStream(t, e.addr, e2eInput, e.parts)
	e2eFeed(t, stream, 10, 400, 400, 10*time.Millisecond, func() bool { return false })
	e2eWaitOutput(t, e, stream, 60*time.Second)
	if err := j.stop(); err != nil {
		t.Fatal(err)
	}
	e2eCheckExactlyOnce(t, e, stream.Want())
}

func topicID(t *testing.T, addr, topic string) [16]byte {
	t.Helper()
	tds, err := kadm.NewClient(kafkatest.Client(t, addr)).ListTopics(context.Background(), topic)
	if err != nil {
		t.Fatal(err)
	}
	td, ok := tds[topic]
	if !ok || td.Err != nil {
		t.Fatalf("topic %s: %v", topic, td.Err)
	}
	return td.ID
}
