package service_test

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluice-stream/sluice/coordinator"
)

// grpHold holds the checkpointer of an instance's tasks at StepUploaded
// (before their metadata create) while armed, for the given tasks.
type grpHold struct {
	release chan struct{}
	once    sync.Once

	mu    sync.Mutex
	tasks map[int32]bool
	held  map[int32]bool
}

func newGrpHold() *grpHold {
	return &grpHold{release: make(chan struct{}), held: map[int32]bool{}}
}

func (h *grpHold) hook(task int32, s coordinator.Step, _ int64) error {
	h.mu.Lock()
	hold := s == coordinator.StepUploaded && h.tasks[task]
	if hold {
		h.held[task] = true
	}
	h.mu.Unlock()
	if hold {
		<-h.release
	}
	return nil
}

func (h *grpHold) arm(tasks []int32) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.tasks = map[int32]bool{}
	for _, t := range tasks {
		h.tasks[t] = true
	}
}

func (h *grpHold) heldTasks() []int32 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return grpSortedKeys(h.held)
}

func (h *grpHold) unhold() { h.once.Do(func() { close(h.release) }) }

// TestGroupZombieStaleSlot covers the two ways a zombie's paused checkpoint
// can find its metadata slot free although the task was taken over, so
// that create-if-absent alone does not stop it:
//   - freed-by-retention: the zombie pauses before creating chk-n; the new
//     owner claims n (the slot after the zombie's newest complete
//     checkpoint), completes a few checkpoints, and its retention deletes
//     chk-n again. Then the zombie resumes.
//   - gap: the zombie's last checkpoints failed (metadata create refused by
//     storage), so the one it pauses in has an id n beyond the slot the new
//     owner claims (newest complete + 1). The new owner's own checkpoints
//     are held before they reach n. Then the zombie resumes.
//
// In both the zombie's create of chk-n succeeds. It must still find that it
// was taken over (a checkpoint newer than its previous one that is not its
// own exists), withdraw chk-n and stop with ErrTakenOver, before committing
// anything; and in the gap case the new owner, released, must complete its
// checkpoints through n undisturbed (without the withdrawal, it would find
// the zombie's chk-n and stop with ErrTakenOver itself). The output is
// exactly once.
func TestGroupZombieStaleSlot(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fails int
	}{
		{"freed-by-retention", 0},
		{"gap", 1}, // MaxPending 2: one failed checkpoint pending, the next one pauses
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newGrpEnv(t)
			hold := newGrpHold()
			defer hold.unhold()
			ac, bc := e.config("A", "classic"), e.config("B", "classic")
			ac.Hook, bc.Hook = hold.hook, hold.hook
			a, b := e.start(ac), e.start(bc)
			zh := newGrpZombieHook(coordinator.StepUploaded)
			zh.fails = tc.fails
			zc := e.config("Z", "classic")
			zc.Hook = zh.hook
			zc.Settings.CommitOffsets = false // see TestGroupZombie
			zstore := coordinator.NewFaultyStorage(grpLocalStorage(t, e.ckptDir))
			zstore.SetFault(zh.fault)
			zc.Storage = zstore
			z := e.start(zc)
			e.waitBalanced(a, b, z)
			pr := e.produce(5, 20*time.Millisecond)
			for _, in := range []*grpInstance{a, b, z} {
				e.waitProgress(in, 50)
			}
			zTasks := z.tasks()
			var member string
			grpWait(t, 30*time.Second, "Z's member id", func() bool {
				member = grpMemberOf(e.cluster, zTasks)
				return member != ""
			})
			if tc.fails > 0 {
				hold.arm(zTasks) // the new owners' checkpoints of Z's tasks wait
			}
			zh.arm()
			grpWait(t, 30*time.Second, fmt.Sprintf("Z's tasks %v paused", zTasks), func() bool {
				return slices.Equal(zh.pausedTasks(), zTasks)
			})
			release := make(chan struct{})
			var releaseOnce sync.Once
			releaseHB := func() { releaseOnce.Do(func() { close(release) }) }
			defer releaseHB()
			grpHoldHeartbeats(e.cluster, "classic", member, release)
			e.waitBalanced(a, b)

			st := grpLocalStorage(t, e.ckptDir)
			ids := func(task int32) []int64 {
				got, err := coordinator.ListCheckpointIDs(context.Background(), st, grpJob, task)
				if err != nil {
					t.Fatal(err)
				}
				return got
			}
			zh.mu.Lock()
			paused := maps.Clone(zh.pausedID)
			zh.mu.Unlock()
			if tc.fails == 0 {
				grpWait(t, 30*time.Second, "the new owners' retention freeing the zombie's slots", func() bool {
					for task, n := range paused {
						got := ids(task)
						if slices.Contains(got, n) || len(got) == 0 || got[0] <= n {
							return false
						}
					}
					return true
				}, func() string { return fmt.Sprintf("(paused at %v)", paused) })
			} else {
				grpWait(t, 30*time.Second, "the new owners' first checkpoints held", func() bool {
					return slices.Equal(hold.heldTasks(), zTasks)
				})
				for task, n := range paused {
					if got := ids(task); len(got) == 0 || got[0] >= n {
						t.Fatalf("task %d: checkpoints %v, want all below the zombie's %d: the gap was not staged", task, got, n)
					}
				}
			}
			t.Logf("zombie paused at checkpoints %v; checkpoints in storage: %v", paused, func() map[int32][]int64 {
				m := map[int32][]int64{}
				for task := range paused {
					m[task] = ids(task)
				}
				return m
			}())

			mark := e.log.mark()
			zh.wake()
			grpWait(t, 30*time.Second, "the zombie's tasks to stop", func() bool {
				return len(grpZombieStops(e.log.since(mark), zTasks)) == len(zTasks)
			}, func() string { return "(log: " + strings.Join(grpZombieLines(e.log.since(mark)), " | ") + ")" })
			for task, line := range grpZombieStops(e.log.since(mark), zTasks) {
				if !strings.Contains(line, coordinator.ErrTakenOver.Error()) {
					t.Errorf("zombie task %d did not stop as taken over: %s", task, line)
				}
			}
			if done := zh.closeWindow(); len(done) > 0 {
				t.Errorf("the zombie completed or committed after the takeover: %v", done)
			}
			for task, n := range paused {
				c, err := coordinator.LoadCheckpoint(context.Background(), st, grpJob, task, n)
				if err == nil && strings.HasPrefix(c.Owner, "Z/") {
					t.Errorf("task %d: the zombie's checkpoint %d is left in storage as complete (owner %s)", task, n, c.Owner)
				}
			}

			hold.unhold()
			grpWait(t, 30*time.Second, "the new owners' checkpoints past the zombie's ids", func() bool {
				for task, n := range paused {
					if got := ids(task); len(got) == 0 || got[0] <= n {
						return false
					}
				}
				return true
			})
			for _, line := range strings.Split(e.log.since(mark), "\n") {
				if (strings.Contains(line, "instance=A") || strings.Contains(line, "instance=B")) && strings.Contains(line, "task failed") {
					t.Errorf("a new owner was disturbed by the zombie: %s", line)
				}
			}
			releaseHB()
			e.waitBalanced(a, b, z)
			if err := pr.stop(); err != nil {
				t.Fatalf("produce: %v", err)
			}
			e.waitOutput(60 * time.Second)
			for _, in := range []*grpInstance{a, b, z} {
				if err := in.stop(); err != nil {
					t.Fatalf("stop %s: %v", in.name, err)
				}
			}
			e.checkExactlyOnce()
		})
	}
}

// grpLocalStorage opens the shared checkpoint folder as another client.
func grpLocalStorage(t *testing.T, dir string) coordinator.Storage {
	t.Helper()
	st, err := coordinator.NewLocalStorage(dir)
	if err != nil {
		t.Fatal(err)
	}
	return st
}
