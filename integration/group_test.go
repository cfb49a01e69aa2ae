package integration

import (
	"fmt"
	"testing"
	"time"

	"github.com/sluice-stream/sluice/integration/sluicetest"
)

// TestRollingRestart replaces 3 processor containers one at a time under
// load: SIGTERM the old one (exit status 0 after its final checkpoints),
// start its replacement, wait until the replacement runs its share of the
// tasks and is ready, then the next. Exactly once, and zero replayed
// records: the sum of the records-in counters of every container that ever
// ran, each scraped just before its SIGTERM, equals the input exactly (a
// replay after a handoff would exceed it).
//
// Each SIGTERM is sent under load; a processor's count is the records_in
// of the "job stopped" line it logs on its way out, after its final
// checkpoints.
func TestRollingRestart(t *testing.T) {
	s := newScenario(t, sluicetest.Options{})
	live := s.start(3)
	s.waitBalanced(live...)
	s.startLoad(2, 50*time.Millisecond)
	for _, p := range live {
		s.waitProgress(p, 50)
	}
	finals := map[string]float64{}
	for i := range live {
		old := live[i]
		finals[old.Name] = s.stopCounted(old)
		repl := s.start(1)[0]
		live[i] = repl
		s.waitBalanced(live...)
		s.waitProgress(repl, 50)
		t.Logf("%s replaced by %s: %s", old.Name, repl.Name, assignment(live...))
	}
	s.stopLoad()
	s.waitAllOutput(2 * time.Minute)
	for _, p := range live {
		finals[p.Name] = s.stopCounted(p)
	}
	s.checkExactlyOnce()
	s.checkNoReplay(finals)
}

// TestScaleOutAndIn scales the job from 1 processor to 3 and back to 1
// under load. Every task moves at least once (to a new processor, then
// back), each time by a graceful handoff: exactly once, the last count of
// every key its true count (the keyed state moved with its task), and no
// record processed twice (as in TestRollingRestart).
func TestScaleOutAndIn(t *testing.T) {
	s := newScenario(t, sluicetest.Options{})
	a := s.start(1)[0]
	s.waitBalanced(a)
	s.startLoad(2, 50*time.Millisecond)
	s.waitProgress(a, 200)

	// 1 → 3.
	bc := s.start(2)
	b, c := bc[0], bc[1]
	s.waitBalanced(a, b, c)
	for _, p := range []*sluicetest.Processor{a, b, c} {
		s.waitProgress(p, 50)
	}
	t.Logf("scaled out: %s", assignment(a, b, c))

	// 3 → 2 → 1.
	finals := map[string]float64{}
	finals[c.Name] = s.stopCounted(c)
	s.waitBalanced(a, b)
	s.waitProgress(b, 50)
	finals[b.Name] = s.stopCounted(b)
	s.waitBalanced(a)
	s.waitProgress(a, 100)
	t.Logf("scaled in: %s", assignment(a))

	s.stopLoad()
	s.waitAllOutput(2 * time.Minute)
	finals[a.Name] = s.stopCounted(a)
	s.checkExactlyOnce()
	s.checkNoReplay(finals)
}

// stopCounted stops p gracefully (SIGTERM, exit 0) under load and returns
// the number of records it read over its life, from its last log line.
func (s *scenario) stopCounted(p *sluicetest.Processor) float64 {
	s.t.Helper()
	stopGracefully(s.t, p)
	for _, l := range logLines(p.Logs(s.t)) {
		if l.Msg == "job stopped" && l.RecordsIn != nil {
			s.t.Logf("%s stopped (exit 0) after processing %v records", p.Name, *l.RecordsIn)
			return *l.RecordsIn
		}
	}
	s.t.Fatalf("%s logged no \"job stopped\" line with records_in", p.Name)
	return 0
}

// checkNoReplay requires the records-in counts of every processor that
// ever ran to add up to the input exactly: none processed twice.
func (s *scenario) checkNoReplay(finals map[string]float64) {
	s.t.Helper()
	total := int64(s.stream.Total())
	got := sumRecordsIn(finals)
	s.t.Logf("records processed per processor: %v (sum %d, input %d)", finals, got, total)
	if got != total {
		s.t.Fatalf("the processors processed %d input records for %d produced: %s", got, total, replayed(got-total))
	}
}

func replayed(d int64) string {
	if d > 0 {
		return fmt.Sprintf("%d processed twice (replayed after a graceful handoff)", d)
	}
	return fmt.Sprintf("%d not counted (a scrape missed records)", -d)
}
