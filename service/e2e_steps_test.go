package service_test

import (
	"math/rand/v2"
	"testing"

	"github.com/sluice-stream/sluice/coordinator"
	"github.com/sluice-stream/sluice/service"
)

// TestE2ECrashAtEveryStep (issue 4) crashes tasks at one named protocol step
// at a time, at least 10 times per step (3 per task on 4 tasks), each at a
// seeded random point of the live input. After each crash the task restarts
// and its takeover recovers. At the end a separate read_committed reader
// must see every input's count exactly once, per key in order, and every
// task's newest checkpoint must hold the true counts.
//
// Steps of the takeover need a takeover: each of their crashes follows a
// crash at a random record (a crash in the recovery commit follows one
// right after a metadata create, so the claim has transactions to commit).
// Crashes between the commits of several pending transactions, and in a
// recovery between the commits of several transactions of the claim, need
// pending ones to pile up: those runs also fail some checkpoints' metadata
// creates (a storage fault), so their transactions wait for the next
// complete checkpoint, and MaxPending is 3.
func TestE2ECrashAtEveryStep(t *testing.T) {
	cases := []struct {
		step coordinator.Step
		// trigger, if set, is crashed at (at a random occurrence) before
		// each crash at step, to cause the takeover step happens in.
		trigger coordinator.Step
		// between: crash only between two commits of one completion.
		between bool
		// several: the trigger is a checkpoint with several pending
		// transactions, so the crash at step comes between two of the
		// recovery's commits.
		several bool
		// faults: fail some metadata creates so transactions accumulate.
		faults bool
	}{
		{step: coordinator.StepBarrier},
		{step: coordinator.StepPreCommitted},
		{step: coordinator.StepUploaded},
		{step: coordinator.StepMetadataCreated},
		{step: coordinator.StepTxnCommitted, between: true, faults: true},
		{step: coordinator.StepCommitted},
		{step: coordinator.StepRecoveryCommit, trigger: coordinator.StepMetadataCreated, several: true, faults: true},
		{step: coordinator.StepClaimed, trigger: coordinator.StepRecord},
		{step: coordinator.StepFenced, trigger: coordinator.StepRecord},
	}
	parts, perTask, minPerPart := int32(4), 3, 300
	if testing.Short() {
		parts, perTask, minPerPart = 2, 2, 100
	}
	for i, tc := range cases {
		t.Run(string(tc.step), func(t *testing.T) {
			seed := e2eSeed(t, uint64(100+i))
			rng := rand.New(rand.NewPCG(seed, 2))
			scripts := map[int32][]e2eCrashPoint{}
			for task := range parts {
				for range perTask {
					if tc.trigger != "" {
						scripts[task] = append(scripts[task], e2eCrashPoint{step: tc.trigger, skip: e2eSkipFor(rng, tc.trigger), several: tc.several})
					}
					scripts[task] = append(scripts[task], e2eCrashPoint{step: tc.step, skip: e2eSkipFor(rng, tc.step), between: tc.between})
				}
			}
			plan := newE2ECrashPlan(seed, scripts)
			if tc.faults {
				// MaxPending 3: up to 2 failed checkpoints in a row, so a
				// completion commits up to 3 transactions.
				plan.failRate, plan.maxFailRun = 0.5, 2
			}
			e := newE2EEnv(t, parts)
			want, perPart := e2eRunPlan(t, e, plan, func(c *service.Config) {
				c.Settings.MaxPending = 3
			}, minPerPart)
			e2eLogPlan(t, plan)

			_, fired, _ := plan.summary()
			if n, min := fired[tc.step], int(parts)*perTask; n < min {
				t.Fatalf("%d crashes at %s, want %d", n, tc.step, min)
			}
			if tc.several && plan.midRecovery != fired[tc.step] {
				t.Fatalf("only %d of %d crashes at %s came between two of the recovery's commits", plan.midRecovery, fired[tc.step], tc.step)
			}
			e2eCheckExactlyOnce(t, e, want)
			e2eCheckFinalState(t, e2eLocalStorage(t, e.ckptDir), parts, perPart, want)
		})
	}
}
