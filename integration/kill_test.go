package integration

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/sluice-stream/sluice/integration/sluicetest"
)

// killSeed seeds the kill schedule; SLUICE_TEST_SEED overrides it to
// explore other schedules.
func killSeed(t *testing.T) uint64 {
	seed := uint64(20261127)
	if v := os.Getenv("SLUICE_TEST_SEED"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("SLUICE_TEST_SEED=%q: %v", v, err)
		}
		seed = n
	}
	t.Logf("seed %d (set SLUICE_TEST_SEED to change)", seed)
	return seed
}

// TestKillLoop kills processor containers with SIGKILL at random times
// under load, 20 times, on a seeded schedule: a random one of 3 processors,
// a random time after the output last grew, brought back after a random
// down time (same container, so it rejoins under the same instance name,
// often before the group expelled its dead predecessor). Every kill lands
// mid-stream and under load: more output was committed before it than
// before the previous kill, and less than the final total. At the end kcat
// (librdkafka, read_committed) and a Go reader must both find every input's
// count exactly once, in order.
//
// The wait for output between kills keeps the group able to recover: with
// kills every ~2 s regardless, the group can stay without any assignment
// for a minute and more (kfake's group coordinator waits out the rebalance
// timeout for members that joined and died, and every new kill starts that
// over), and the kills would hit processors that run nothing.
func TestKillLoop(t *testing.T) {
	const kills = 20
	rng := rand.New(rand.NewPCG(killSeed(t), 7))
	s := newScenario(t, sluicetest.Options{})
	procs := s.start(3, shortGroupArgs()...)
	s.waitBalanced(procs...)
	s.startLoad(2, 50*time.Millisecond)
	for _, p := range procs {
		s.waitProgress(p, 30)
	}

	type kill struct {
		Proc      string
		Committed int // output visible to read_committed at the kill
		Produced  int // input produced at the kill
	}
	var done []kill
	committed := 0
	for i := range kills {
		p := procs[rng.IntN(len(procs))]
		since := committed
		s.waitFor(2*time.Minute, fmt.Sprintf("output committed since kill %d", i), func() bool {
			return s.out.Len() >= since+100
		}, func() string { return fmt.Sprintf("%d committed; %s", s.out.Len(), assignment(procs...)) })
		time.Sleep(time.Duration(rng.IntN(1500)) * time.Millisecond) // run time
		k := kill{Proc: p.Name, Committed: s.out.Len(), Produced: s.stream.Total()}
		p.Kill(t)
		done = append(done, k)
		committed = k.Committed
		time.Sleep(time.Duration(rng.IntN(1500)) * time.Millisecond) // down time
		p.Start(t)
	}
	t.Logf("%d kills (processor, output committed, input produced): %+v", len(done), done)

	// Recovered: every task runs again, the output catches up.
	s.waitBalanced(procs...)
	s.stopLoad()
	s.waitAllOutput(3 * time.Minute)
	total := s.stream.Total()
	for i, k := range done {
		if k.Committed <= 0 || k.Committed >= total || (i > 0 && k.Committed <= done[i-1].Committed) {
			t.Errorf("kill %d of %s happened with %d of %d outputs committed (previous kill: %d): not mid-stream under load",
				i+1, k.Proc, k.Committed, total, done[max(i-1, 0)].Committed)
		}
	}
	for _, p := range procs {
		stopGracefully(t, p)
	}
	s.checkExactlyOnceKcat()
	s.checkExactlyOnce()
}
