package service_test

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sluice-stream/sluice/coordinator"
	"github.com/sluice-stream/sluice/internal/kafkatest"
)

// TestE2ELingeringTransactionsOfALargerPool proves the takeover's rule
// "ids of the job's prefix outside today's pool (a smaller pool) are found
// with ListTransactions and aborted too, so no lingering transaction pins
// the last stable offset".
//
// The job first runs with MaxPending 4 (a pool of 5 transactional ids).
// Checkpoints 2, 3 and 4 fail in storage, so their transactions stay
// pending on slots 0-2, and the task crashes right after pre-committing
// checkpoint 5 on slot 3; the process stops there, so nobody cleans up:
// the broker holds open transactions on slot 3 (and maybe 4), outside the
// pool of the next run. The job restarts with MaxPending 2 (a pool of 3:
// slots 0-2). Its transaction timeout is a minute, so only the takeover can
// end them in time. It proves that
//   - after the restart's takeover kadm ListTransactions shows no Ongoing
//     transaction of the job's prefix outside the new pool, and none at all
//     once the job stopped;
//   - a sentinel-based read_committed read of the output completes (a
//     lingering transaction would pin the last stable offset and time it
//     out), with every input's count exactly once, and the final state is
//     the true counts;
//   - the two processes leave no goroutine behind (goleak).
func TestE2ELingeringTransactionsOfALargerPool(t *testing.T) {
	e2eNoLeaks(t)
	e := newE2EEnv(t, 1)
	stream := kafkatest.NewStream(t, e.addr, e2eInput, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := stream.Produce(ctx, 100); err != nil {
		t.Fatal(err)
	}

	// Run 1: pool of 5.
	fs := coordinator.NewFaultyStorage(e2eLocalStorage(t, e.ckptDir))
	var mu sync.Mutex
	failOnce := map[string]bool{}
	for id := int64(2); id <= 4; id++ {
		failOnce[coordinator.MetadataName(e2eJob, 0, id)] = true
	}
	fs.SetFault(func(op coordinator.Op, name string) error {
		mu.Lock()
		defer mu.Unlock()
		if op == coordinator.OpCreate && failOnce[name] {
			delete(failOnce, name)
			return errE2EStorage
		}
		return nil
	})
	reached, release := make(chan struct{}), make(chan struct{})
	hook := func(_ int32, s coordinator.Step, id int64) error {
		if s == coordinator.StepPreCommitted && id == 5 {
			close(reached)
			<-release // until the process is stopping: no restart
			return coordinator.ErrCrash
		}
		return nil
	}
	c := e.config()
	c.Settings.MaxPending = 4
	c.Settings.TolerableFailures = 5
	c.Storage = fs
	c.Hook = hook
	j := e2eStart(t, c, e2eLogger(t))
	select {
	case <-reached:
	case <-ctx.Done():
		t.Fatal("checkpoint 5 was not pre-committed")
	}
	j.cancel()
	close(release)
	if err := j.stop(); err != nil {
		t.Fatalf("run 1: %v", err)
	}
	lingering := e2eOngoing(t, e.addr)
	t.Logf("open transactions after run 1: %v", lingering)
	if !slices.Contains(lingering, "sluice-"+e2eJob+"-0-3") {
		t.Fatalf("run 1 left no open transaction on slot 3 (open: %v): nothing would be proven", lingering)
	}

	// Run 2: pool of 3.
	c = e.config()
	c.Settings.MaxPending = 2
	j = e2eStart(t, c, e2eLogger(t))
	stats := j.stats(t, 0)
	e2eWaitFor(t, 30*time.Second, "the takeover of run 2", func() bool { return stats.Restored.Load() != 0 })
	for _, id := range e2eOngoing(t, e.addr) {
		if id == "sluice-"+e2eJob+"-0-3" || id == "sluice-"+e2eJob+"-0-4" {
			t.Fatalf("transaction of %s still open after the takeover of a pool of 3", id)
		}
	}
	if err := stream.Produce(ctx, 100); err != nil {
		t.Fatal(err)
	}
	e2eWaitOutput(t, e, stream, 30*time.Second)
	if err := j.stop(); err != nil {
		t.Fatalf("run 2: %v", err)
	}
	if open := e2eOngoing(t, e.addr); len(open) > 0 {
		t.Fatalf("open transactions of the job after it stopped: %v", open)
	}
	e2eCheckExactlyOnce(t, e, stream.Want())
	e2eCheckFinalState(t, e2eLocalStorage(t, e.ckptDir), 1, int64(stream.Total()), stream.Want())
}
