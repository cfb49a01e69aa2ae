package integration

import (
	"fmt"
	"testing"
	"time"

	"github.com/sluice-stream/sluice/integration/sluicetest"
)

// TestS3Pause keeps the checkpoints in an S3 container and freezes it
// (docker pause) for 30 s under load. Checkpoints then fail (each times
// out after 5 s); once every transactional id of a task's pool is pending
// on a failed checkpoint, the task restarts from its newest complete
// checkpoint, and keeps restarting (with backoff) while the store does not
// answer. The processes go on; once the store is back, the tasks restore,
// replay what was not committed, and checkpoints complete again: every
// input's count exactly once. The processors' /metrics must show failed
// checkpoints during the pause and completed ones after it.
func TestS3Pause(t *testing.T) {
	const pause = 30 * time.Second
	s := newScenario(t, sluicetest.Options{S3: true})
	procs := s.start(2, "--checkpoint-timeout", "5s")
	s.waitBalanced(procs...)
	s.startLoad(2, 50*time.Millisecond)
	for _, p := range procs {
		s.waitProgress(p, 50)
	}
	sum := func(name string) float64 {
		var n float64
		for _, p := range procs {
			n += scrape(p).Sum(name)
		}
		return n
	}
	failed0, completed0 := sum("sluice_checkpoints_failed_total"), sum("sluice_checkpoints_completed_total")
	in0, out0 := sum("sluice_records_in_total"), s.out.Len()

	s.env.S3.Pause(t)
	paused := time.Now()
	time.Sleep(pause)
	failed1, completed1 := sum("sluice_checkpoints_failed_total"), sum("sluice_checkpoints_completed_total")
	in1, out1 := sum("sluice_records_in_total"), s.out.Len()
	for _, p := range procs {
		if !p.Running(t) {
			t.Fatalf("%s exited while the S3 store was paused", p.Name)
		}
	}
	s.env.S3.Unpause(t)
	t.Logf("S3 paused %s: checkpoints failed %v → %v, completed %v → %v; records in %v → %v; output committed %d → %d",
		time.Since(paused).Round(100*time.Millisecond), failed0, failed1, completed0, completed1, in0, in1, out0, out1)
	if failed1 <= failed0 {
		t.Fatalf("no checkpoint failed while the S3 store was paused for %s", pause)
	}

	// Back: checkpoints complete and commit again.
	s.waitFor(2*time.Minute, "checkpoints completing after the pause", func() bool {
		return sum("sluice_checkpoints_completed_total") >= completed1+10
	}, func() string { return fmt.Sprintf("completed %v", sum("sluice_checkpoints_completed_total")) })
	s.out.WaitLen(t, out1+500, 2*time.Minute)
	restarts := 0
	for _, p := range procs {
		restarts += countLines(logLines(p.Logs(t)), "task failed; restarting")
	}
	t.Logf("after the pause: checkpoints completed %v, output committed %d; %d task restarts logged", sum("sluice_checkpoints_completed_total"), s.out.Len(), restarts)

	s.stopLoad()
	s.waitAllOutput(3 * time.Minute)
	for _, p := range procs {
		stopGracefully(t, p)
	}
	s.checkExactlyOnce()
}
