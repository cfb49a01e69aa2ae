package service_test

import (
	"math/rand/v2"
	"testing"

	"github.com/sluice-stream/sluice/coordinator"
	"github.com/sluice-stream/sluice/service"
)

// e2eCrashUnits are the crash scripts a task can be given, one per protocol
// step; a crash in the recovery commit needs a complete checkpoint with
// pending transactions, so it follows a crash right after a metadata create.
var e2eCrashUnits = [][]coordinator.Step{
	{coordinator.StepRecord},
	{coordinator.StepBarrier},
	{coordinator.StepPreCommitted},
	{coordinator.StepUploaded},
	{coordinator.StepMetadataCreated},
	{coordinator.StepTxnCommitted},
	{coordinator.StepCommitted},
	{coordinator.StepClaimed},
	{coordinator.StepFenced},
	{coordinator.StepMetadataCreated, coordinator.StepRecoveryCommit},
}

// e2eSkipFor draws how many occurrences of step to let pass before a crash:
// records are many, checkpoint steps recur every interval, and takeover
// steps happen once per restart (so they crash at the first).
func e2eSkipFor(rng *rand.Rand, s coordinator.Step) int {
	switch s {
	case coordinator.StepRecord:
		return rng.IntN(200)
	case coordinator.StepClaimed, coordinator.StepFenced, coordinator.StepRecoveryCommit:
		return 0
	}
	return rng.IntN(4)
}

// TestE2ECrashLoop (issue 3) crashes the count job's tasks over and over at
// seeded random points, at random records and at every protocol step
// (including between the state snapshot and the metadata create), while
// some checkpoints also fail in storage, so transactions pile up pending.
// Each crash restarts the task from its newest retained checkpoint. It
// proves that afterwards
//   - a separate read_committed reader sees every input's count exactly
//     once, per key in order (nothing lost, nothing doubled), and
//   - every task's newest checkpoint, restored as a new incarnation would,
//     covers the whole input and holds exactly the true count of each key.
func TestE2ECrashLoop(t *testing.T) {
	seed := e2eSeed(t, 3)
	parts, perTask, minPerPart := int32(8), 3, 500
	if testing.Short() {
		parts, perTask, minPerPart = 4, 1, 200
	}
	rng := rand.New(rand.NewPCG(seed, 1))
	// Every unit once, then random ones up to perTask per task, dealt to the
	// tasks round robin; each task first crashes at a random record.
	bag := append([][]coordinator.Step(nil), e2eCrashUnits...)
	for len(bag) < int(parts)*perTask {
		bag = append(bag, e2eCrashUnits[rng.IntN(len(e2eCrashUnits))])
	}
	rng.Shuffle(len(bag), func(i, j int) { bag[i], bag[j] = bag[j], bag[i] })
	scripts := map[int32][]e2eCrashPoint{}
	for i, unit := range bag {
		task := int32(i) % parts
		if len(scripts[task]) == 0 {
			scripts[task] = append(scripts[task], e2eCrashPoint{step: coordinator.StepRecord, skip: e2eSkipFor(rng, coordinator.StepRecord)})
		}
		for _, s := range unit {
			scripts[task] = append(scripts[task], e2eCrashPoint{step: s, skip: e2eSkipFor(rng, s)})
		}
	}
	plan := newE2ECrashPlan(seed, scripts)
	plan.failRate, plan.maxFailRun = 0.25, 2

	e := newE2EEnv(t, parts)
	want, perPart := e2eRunPlan(t, e, plan, func(c *service.Config) {
		c.Settings.MaxPending = 3
		c.Settings.Retained = 2
	}, minPerPart)
	e2eLogPlan(t, plan)

	crashes, fired, _ := plan.summary()
	if min := 20; !testing.Short() && crashes < min {
		t.Fatalf("only %d crashes injected, want at least %d", crashes, min)
	}
	for _, unit := range e2eCrashUnits {
		for _, s := range unit {
			if fired[s] == 0 {
				t.Errorf("no crash was injected at step %s", s)
			}
		}
	}
	e2eCheckExactlyOnce(t, e, want)
	e2eCheckFinalState(t, e2eLocalStorage(t, e.ckptDir), parts, perPart, want)
}
