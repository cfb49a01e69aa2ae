package service_test

import (
	"sync"
	"testing"
	"time"

	"github.com/sluice-stream/sluice/coordinator"
)

// grpKillHook kills an instance's tasks the hard way once armed: each task
// crashes (coordinator.ErrCrash) right after its next checkpoint completed
// (metadata created, its transactions not yet committed), and every later
// step of that task crashes too, so the restarts the instance attempts die
// at their claim, before recovering or fencing anything. What a killed
// process leaves behind is exactly that: a complete checkpoint whose
// transactions are still open, and the open transaction of the records
// processed after it.
type grpKillHook struct {
	mu      sync.Mutex
	armed   bool
	crashed map[int32]int64 // task → checkpoint it crashed after
}

func (h *grpKillHook) hook(task int32, s coordinator.Step, id int64) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.armed {
		return nil
	}
	if _, dead := h.crashed[task]; dead {
		return coordinator.ErrCrash
	}
	if s == coordinator.StepMetadataCreated {
		h.crashed[task] = id
		return coordinator.ErrCrash
	}
	return nil
}

func (h *grpKillHook) arm() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.armed = true
}

// dead returns the tasks crashed so far, with the checkpoint each crashed
// after.
func (h *grpKillHook) dead() map[int32]int64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make(map[int32]int64, len(h.crashed))
	for k, v := range h.crashed {
		out[k] = v
	}
	return out
}

// TestGroupKilledInstance kills one of 3 instances under load without any
// final checkpoint and checks that the other two take its tasks over with
// exactly-once output.
//
// The kill: grpKillHook crashes each of K's tasks right after a checkpoint
// completed and before its transactions were committed (and keeps crashing
// the instance's restarts of them at their claim). Then Instance.Lose stops
// the tasks' supervisors without a final checkpoint, and K's Run is
// cancelled, which now only leaves the group (its revoke callback finds no
// task left to checkpoint); its clients are closed. The group moves K's
// tasks at once (LeaveGroup) rather than after a session timeout: the
// session-expiry path is TestGroupZombie's. The new owners must commit the
// crashed checkpoints' pending transactions (or find them lost and replay),
// fence the open ones, restore the state and replay the input processed
// after the crashed checkpoint: the output is still exactly once.
func TestGroupKilledInstance(t *testing.T) {
	for _, protocol := range grpProtocols() {
		t.Run(protocol, func(t *testing.T) {
			e := newGrpEnv(t)
			kill := &grpKillHook{crashed: map[int32]int64{}}
			a := e.start(e.config("A", protocol))
			b := e.start(e.config("B", protocol))
			kc := e.config("K", protocol)
			kc.Hook = kill.hook
			k := e.start(kc)
			e.waitBalanced(a, b, k)
			pr := e.produce(5, 20*time.Millisecond)
			for _, in := range []*grpInstance{a, b, k} {
				e.waitProgress(in, 50)
			}

			victims := k.tasks()
			kill.arm()
			grpWait(t, 30*time.Second, "every task of K crashed after a completed checkpoint", func() bool {
				return len(kill.dead()) == len(victims)
			})
			k.p.Instance.Lose(victims)
			if err := k.stop(); err != nil {
				t.Fatalf("stop K: %v", err)
			}
			t.Logf("killed K; its tasks crashed after checkpoints %v", kill.dead())

			e.waitBalanced(a, b)
			for _, in := range []*grpInstance{a, b} {
				e.waitProgress(in, 50)
			}
			if err := pr.stop(); err != nil {
				t.Fatalf("produce: %v", err)
			}
			e.waitOutput(60 * time.Second)
			for _, in := range []*grpInstance{a, b} {
				if err := in.stop(); err != nil {
					t.Fatalf("stop %s: %v", in.name, err)
				}
			}
			e.checkExactlyOnce()
			total := int64(e.stream.Total())
			replayed := grpRecordsIn(a, b, k) - total
			t.Logf("%d records processed again after the kill (K's work since its last committed checkpoint)", replayed)
			if replayed <= 0 {
				t.Fatalf("nothing was replayed (%d): the kill did not lose any uncommitted work, so the test proved nothing", replayed)
			}
		})
	}
}
