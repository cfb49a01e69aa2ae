package service_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/sluice-stream/sluice/coordinator"
	"github.com/sluice-stream/sluice/internal/example"
	"github.com/sluice-stream/sluice/internal/kafkatest"
	"github.com/sluice-stream/sluice/sink"
	"github.com/sluice-stream/sluice/source"
	"github.com/sluice-stream/sluice/state"
)

// e2eOwner is one incarnation of task 0 with its own process-like pieces
// (Kafka source, Kafka sink, Pebble, a storage client over the shared
// checkpoint folder), so two owners of the same task are like two
// processes. The test drives its barriers.
type e2eOwner struct {
	name    string
	task    *coordinator.Task
	stats   *coordinator.TaskStats
	trigger chan struct{}
	cancel  context.CancelFunc
	done    chan error
	closers []func()
}

func startOwner(t *testing.T, e *e2eEnv, name string, hook coordinator.Hook, log *slog.Logger) *e2eOwner {
	t.Helper()
	ctx := context.Background()
	settings := coordinator.DefaultSettings()
	settings.Timeout = 30 * time.Second
	settings.Retained = 100 // keep every checkpoint for the ownership check
	settings.CommitOffsets = false
	settings.TransactionTimeout = time.Minute
	settings.StopTimeout = 20 * time.Second
	o := &e2eOwner{name: name, stats: &coordinator.TaskStats{}, trigger: make(chan struct{}, 1), done: make(chan error, 1)}
	src, err := source.New(ctx, source.Config{Brokers: []string{e.addr}, Group: e2eJob, Topics: []string{e2eInput}, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	srcCtx, stopSrc := context.WithCancel(ctx)
	srcDone := make(chan struct{})
	go func() { _ = src.Run(srcCtx); close(srcDone) }()
	o.closers = append(o.closers, func() { stopSrc(); <-srcDone; src.Close() })
	k, err := sink.NewKafka(ctx, sink.KafkaConfig{
		Brokers: []string{e.addr}, Job: e2eJob, PoolSize: settings.MaxPending + 1,
		TransactionTimeout: settings.TransactionTimeout, Logger: log,
	})
	if err != nil {
		t.Fatal(err)
	}
	o.closers = append(o.closers, k.Close)
	pf := state.NewPebbleFactory(8 << 20)
	o.closers = append(o.closers, func() { pf.Close() })
	o.task = coordinator.NewTask(coordinator.TaskConfig{
		Job: example.CountJob(e2eJob, e2eInput, e2eOutput), Task: 0, Storage: e2eLocalStorage(t, e.ckptDir),
		Sink: k, State: pf, Input: &coordinator.KafkaInput{Source: src},
		WorkDir: filepath.Join(e.workDir, name), Settings: settings, Owner: "owner-" + name,
		Trigger: o.trigger, Hook: hook, Log: log.With("owner", name), Stats: o.stats,
	})
	runCtx, cancel := context.WithCancel(ctx)
	o.cancel = cancel
	go func() { o.done <- o.task.Run(runCtx) }()
	t.Cleanup(o.close)
	return o
}

// barrier asks the owner for a checkpoint.
func (o *e2eOwner) barrier() {
	select {
	case o.trigger <- struct{}{}:
	default:
	}
}

func (o *e2eOwner) close() {
	o.cancel()
	for i := len(o.closers) - 1; i >= 0; i-- {
		o.closers[i]()
	}
	o.closers = nil
}

// TestE2EZombieCannotCompleteNorCommit (issue 3's zombie) runs two owners of
// the same task over the same Kafka and checkpoint folder, like two
// processes. Owner A is paused inside its checkpoint at a protocol step
// (blocked in the hook, as by a GC pause or a network partition) while
// owner B takes the task over: it claims the next checkpoint slot, commits
// what A's newest complete checkpoint listed, and fences the pool. A's task
// loop keeps processing new input meanwhile, writing output into
// transactions B has fenced. Then A resumes. It proves that
//   - A stops: with ErrTakenOver when paused before its metadata create
//     (the create finds B's claim), with ErrTakenOver or sink.ErrFenced
//     when paused after it (its commit is fenced), and
//   - no checkpoint at or after B's claim was written by A, and
//   - A's records never become visible: a separate read_committed reader
//     sees every input's count exactly once, and B's final checkpoint holds
//     the true counts;
//   - both owners, stopped, leave no goroutine behind (goleak).
func TestE2EZombieCannotCompleteNorCommit(t *testing.T) {
	cases := []struct {
		pause coordinator.Step
		// claim is the checkpoint B claims: after the pause at
		// metadata-created A's checkpoint 3 is complete, so B claims 4 and
		// commits A's transaction of 3 itself.
		claim int64
	}{
		{coordinator.StepPreCommitted, 3},
		{coordinator.StepUploaded, 3},
		{coordinator.StepMetadataCreated, 4},
	}
	for _, tc := range cases {
		t.Run(string(tc.pause), func(t *testing.T) {
			e2eNoLeaks(t)
			e := newE2EEnv(t, 1)
			log := e2eLogger(t)
			stream := kafkatest.NewStream(t, e.addr, e2eInput, 1)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			produce := func(n int) {
				t.Helper()
				if err := stream.Produce(ctx, n); err != nil {
					t.Fatal(err)
				}
			}

			// A pauses at tc.pause of checkpoint 3 (1 is its claim, 2 its
			// first checkpoint).
			paused, resume := make(chan struct{}), make(chan struct{})
			var pauseOnce, resumeOnce sync.Once
			resumeA := func() { resumeOnce.Do(func() { close(resume) }) }
			defer resumeA() // never leave A blocked, even when the test fails
			hookA := func(_ int32, s coordinator.Step, id int64) error {
				if s == tc.pause && id == 3 {
					pauseOnce.Do(func() { close(paused) })
					<-resume
				}
				return nil
			}
			a := startOwner(t, e, "A", hookA, log)
			produce(100)
			e2eWaitFor(t, 20*time.Second, "A processed the first 100 records", func() bool { return a.stats.RecordsIn.Load() == 100 })
			a.barrier()
			e2eWaitFor(t, 20*time.Second, "A completed checkpoint 2", func() bool { return a.stats.CheckpointsCompleted.Load() == 1 })
			produce(100)
			e2eWaitFor(t, 20*time.Second, "A processed 200 records", func() bool { return a.stats.RecordsIn.Load() == 200 })
			a.barrier()
			select {
			case <-paused:
			case <-ctx.Done():
				t.Fatal("A did not reach the pause")
			}
			completedA := a.stats.CheckpointsCompleted.Load()

			// B takes over while A is paused, and runs with periodic barriers.
			b := startOwner(t, e, "B", nil, log)
			e2eWaitFor(t, 20*time.Second, "B restored", func() bool { return b.stats.Restored.Load() != 0 })
			if got := b.stats.Restored.Load(); got != tc.claim {
				t.Fatalf("B runs from checkpoint %d, want its claim %d", got, tc.claim)
			}
			stopTicks := make(chan struct{})
			var ticks sync.WaitGroup
			ticks.Go(func() {
				tk := time.NewTicker(20 * time.Millisecond)
				defer tk.Stop()
				for {
					select {
					case <-stopTicks:
						return
					case <-tk.C:
						b.barrier()
					}
				}
			})
			defer func() { close(stopTicks); ticks.Wait() }()

			// New input: both owners process it; A's output goes into
			// fenced transactions.
			outBefore := a.stats.RecordsOut.Load()
			produce(100)
			e2eWaitFor(t, 20*time.Second, "A (the zombie) processed all 300 records", func() bool { return a.stats.RecordsIn.Load() == 300 })
			if a.stats.RecordsOut.Load() <= outBefore {
				t.Fatal("the zombie wrote no output after the takeover; nothing would be proven")
			}

			// A resumes; it is asked for more checkpoints until it stops.
			resumeA()
			var errA error
			e2eWaitFor(t, 30*time.Second, "A stopped", func() bool {
				select {
				case errA = <-a.done:
					return true
				default:
					a.barrier()
					return false
				}
			})
			// Before its metadata create, A must find B's claim in the slot;
			// after it, A's commit is fenced (B committed the transaction),
			// or, if the broker answers A's commit as a harmless repeat, its
			// next create finds B's checkpoints.
			if tc.pause != coordinator.StepMetadataCreated && !errors.Is(errA, coordinator.ErrTakenOver) {
				t.Fatalf("A stopped with %v, want ErrTakenOver", errA)
			}
			if !errors.Is(errA, coordinator.ErrTakenOver) && !errors.Is(errA, sink.ErrFenced) {
				t.Fatalf("A stopped with %v, want ErrTakenOver or sink.ErrFenced", errA)
			}
			t.Logf("zombie stopped: %v", errA)
			if got := a.stats.CheckpointsCompleted.Load(); got > completedA+1 || (got == completedA+1 && tc.pause != coordinator.StepMetadataCreated) {
				t.Fatalf("A completed %d checkpoints after its pause (from %d)", got-completedA, completedA)
			}

			// B finishes the input and stops with a final checkpoint.
			e2eWaitOutput(t, e, stream, 30*time.Second)
			b.cancel()
			if err := <-b.done; err != nil {
				t.Fatalf("B: %v", err)
			}
			st := e2eLocalStorage(t, e.ckptDir)
			checkOwners(t, st, tc.claim)
			e2eCheckExactlyOnce(t, e, stream.Want())
			e2eCheckFinalState(t, st, 1, int64(stream.Total()), stream.Want())
		})
	}
}

// checkOwners asserts that every checkpoint from B's claim on was written
// by B: the zombie completed none.
func checkOwners(t *testing.T, st coordinator.Storage, claim int64) {
	t.Helper()
	ctx := context.Background()
	ids, err := coordinator.ListCheckpointIDs(ctx, st, e2eJob, 0)
	if err != nil {
		t.Fatal(err)
	}
	var seen []string
	for _, id := range ids {
		c, err := coordinator.LoadCheckpoint(ctx, st, e2eJob, 0, id)
		if err != nil {
			t.Fatal(err)
		}
		seen = append(seen, fmt.Sprintf("%d:%s/%s", id, c.Owner, c.Kind))
		if id >= claim && c.Owner != "owner-B" {
			t.Fatalf("checkpoint %d was written by %s after B claimed %d (checkpoints %v)", id, c.Owner, claim, seen)
		}
		if id == claim && c.Kind != coordinator.KindClaim {
			t.Fatalf("checkpoint %d is a %s, want B's claim", id, c.Kind)
		}
	}
	if len(ids) == 0 || ids[0] <= claim {
		t.Fatalf("B completed no checkpoint after its claim %d (checkpoints %v)", claim, ids)
	}
}
