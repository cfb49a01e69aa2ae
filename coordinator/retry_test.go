package coordinator

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluice-stream/sluice/internal/example"
	"github.com/sluice-stream/sluice/internal/kafkatest"
	"github.com/sluice-stream/sluice/state"
)

// TestFailedCheckpointRetriedAfterOutage: the checkpoint storage fails every
// request long enough for every transactional id to be pending on failed
// checkpoints. With a high tolerable-failure count the task does not
// restart; once the store is back, the newest failed checkpoint is
// completed again, which commits every pending transaction: all output is
// committed exactly once by the first incarnation, nothing replayed.
func TestFailedCheckpointRetriedAfterOutage(t *testing.T) {
	const perPart = 600
	records, want := genInput("events", 1, perPart)
	input := &gatedInput{topic: "events", parts: records}
	input.avail.Store(200)
	broker := newFakeBroker()
	mem := NewMemStorage()
	st := NewFaultyStorage(mem)
	var outage atomic.Bool
	st.SetFault(func(op Op, name string) error {
		if outage.Load() {
			return errors.New("injected outage")
		}
		return nil
	})
	var claims atomic.Int32
	hook := func(_ int32, s Step, _ int64) error {
		if s == StepClaimed {
			claims.Add(1)
		}
		return nil
	}
	settings := DefaultSettings()
	settings.Interval = 10 * time.Millisecond
	settings.TolerableFailures = 1000
	in := NewInstance(InstanceConfig{
		Job: example.CountJob("counts", "events", "counts"), Storage: st, Sink: &fakeSink{b: broker, pool: settings.MaxPending + 1},
		State: state.NewMemoryFactory(), Input: input, Tasks: []int32{0}, WorkDir: t.TempDir(), Settings: settings, ID: "i", Hook: hook,
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- in.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	committed := func() int { return len(broker.readCommitted("counts")) }
	waitFor(t, 30*time.Second, "first records committed", func() bool { return committed() == 200 })

	outage.Store(true)
	input.avail.Store(400)
	stats := in.Stats()[0]
	failedBefore := stats.CheckpointsFailed.Load()
	waitFor(t, 30*time.Second, "every transactional id pending on failed checkpoints", func() bool {
		return stats.RecordsIn.Load() == 400 && stats.CheckpointsFailed.Load() >= failedBefore+int64(settings.MaxPending)+3
	})
	if n := committed(); n != 200 {
		t.Fatalf("%d outputs committed during the outage, want 200", n)
	}

	outage.Store(false)
	input.avail.Store(perPart)
	waitFor(t, 30*time.Second, "all output committed after the outage", func() bool { return committed() >= perPart })
	kafkatest.CheckCounts(t, broker.readCommitted("counts"), want)
	if n := claims.Load(); n != 1 {
		t.Errorf("%d takeovers: the task restarted instead of retrying its failed checkpoint", n)
	}
}
