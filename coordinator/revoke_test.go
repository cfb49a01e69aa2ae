package coordinator

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/sluice-stream/sluice/internal/example"
	"github.com/sluice-stream/sluice/internal/kafkatest"
	"github.com/sluice-stream/sluice/state"
)

// TestRevokeDeadlineBoundsFinalCheckpoint revokes a task whose final
// checkpoint stalls in storage: the revoke's deadline, not the much longer
// StopTimeout, releases it, and the next owner then recovers the task with
// every output exactly once (the final checkpoint's open transaction is
// aborted by the fencing and its input replayed).
func TestRevokeDeadlineBoundsFinalCheckpoint(t *testing.T) {
	const records = 300
	input, want := genInput("events", 1, records)
	broker := newFakeBroker()
	mem := NewMemStorage()
	st := NewFaultyStorage(mem)
	job := example.CountJob("counts", "events", "counts")
	settings := DefaultSettings()
	settings.StopTimeout = 30 * time.Second
	settings.Interval = time.Hour // the final checkpoint is the only one

	in1 := NewInstance(InstanceConfig{
		Job: job, Storage: st, Sink: &fakeSink{b: broker, pool: settings.MaxPending + 1}, State: state.NewMemoryFactory(),
		Input: newFakeInput("events", input), WorkDir: t.TempDir(), Settings: settings, ID: "i1",
		Hook: func(_ int32, s Step, _ int64) error {
			if s == StepBarrier {
				st.Stall() // the storage of the final checkpoint hangs
			}
			return nil
		},
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- in1.Run(ctx) }()
	in1.Assign([]int32{0})
	waitFor(t, 20*time.Second, "every record processed", func() bool {
		st := in1.Stats()[0]
		return st != nil && st.RecordsIn.Load() == records
	})

	const deadline = 300 * time.Millisecond
	rctx, cancelRevoke := context.WithTimeout(context.Background(), deadline)
	start := time.Now()
	in1.Revoke(rctx, []int32{0})
	elapsed := time.Since(start)
	cancelRevoke()
	if elapsed < deadline || elapsed > 5*time.Second {
		t.Fatalf("revoke returned after %s; want just after its deadline %s (StopTimeout is %s)", elapsed, deadline, settings.StopTimeout)
	}
	if n := in1.Stats()[0].CheckpointsCompleted.Load(); n != 0 {
		t.Fatalf("%d checkpoints completed, want none: the final one was stalled", n)
	}
	if n := len(broker.readCommitted("counts")); n != 0 {
		t.Fatalf("%d outputs committed without a complete checkpoint", n)
	}
	if broker.openCount() == 0 {
		t.Fatal("the final checkpoint's transaction is not open: the test did not stall it")
	}
	st.Unstall()
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	// The next owner recovers: output exactly once, state exact.
	settings.Interval = 2 * time.Millisecond
	in2 := NewInstance(InstanceConfig{
		Job: job, Storage: st, Sink: &fakeSink{b: broker, pool: settings.MaxPending + 1}, State: state.NewMemoryFactory(),
		Input: newFakeInput("events", input), Tasks: []int32{0}, WorkDir: t.TempDir(), Settings: settings, ID: "i2",
	})
	ctx, cancel = context.WithCancel(context.Background())
	go func() { done <- in2.Run(ctx) }()
	waitFor(t, 20*time.Second, "the next owner's output committed", func() bool {
		return len(broker.readCommitted("counts")) >= records
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	kafkatest.CheckCounts(t, broker.readCommitted("counts"), want)
	checkFinalState(t, mem, "counts", 1, want)
}

// TestBarrierContextBounds checks when a barrier in progress at a stop is
// interrupted: at once for a lost task, after grace for a revoke without
// deadline, and at the revoke's deadline when that comes first.
func TestBarrierContextBounds(t *testing.T) {
	for _, tc := range []struct {
		name      string
		revoke    time.Duration // the revoke's deadline; 0: a lost task, <0: none
		grace     time.Duration
		min, max  time.Duration
		wantCause string
	}{
		{"lost", 0, time.Hour, 0, 5 * time.Second, ErrLost.Error()},
		{"revoked without deadline", -1, 100 * time.Millisecond, 100 * time.Millisecond, 5 * time.Second, "stop timeout"},
		{"revoked with deadline", 100 * time.Millisecond, time.Hour, 100 * time.Millisecond, 5 * time.Second, "revoke deadline passed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var cause error = ErrLost
			switch {
			case tc.revoke < 0:
				cause = revoked{context.Background()}
			case tc.revoke > 0:
				rctx, cancel := context.WithTimeout(context.Background(), tc.revoke)
				defer cancel()
				cause = revoked{rctx}
			}
			ctx, stop := context.WithCancelCause(context.Background())
			bctx, release := barrierContext(ctx, tc.grace)
			defer release()
			start := time.Now()
			stop(cause)
			select {
			case <-bctx.Done():
			case <-time.After(tc.max):
				t.Fatalf("barrier context still running %s after the stop", tc.max)
			}
			if d := time.Since(start); d < tc.min {
				t.Fatalf("barrier context ended %s after the stop, before %s", d, tc.min)
			}
			if cause := context.Cause(bctx); !strings.Contains(cause.Error(), tc.wantCause) {
				t.Fatalf("cause %v, want it to say %q", cause, tc.wantCause)
			}
		})
	}
	// A revoke is a graceful stop to every check of the cause.
	if !errors.Is(revoked{}, context.Canceled) || errors.Is(revoked{}, ErrLost) {
		t.Fatal("revoked must be context.Canceled and not ErrLost to errors.Is")
	}
}
