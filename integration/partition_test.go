package integration

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/sluice-stream/sluice/integration/sluicetest"
)

// TestNetworkPartition cuts one of 3 processors off the network (docker
// network disconnect) under load for 4 session timeouts, then reconnects
// it. Meanwhile the group expels it and the other two take its tasks over
// from the shared checkpoints, fencing its transactional ids; the cut-off
// processor keeps running as a zombie (it still reaches the checkpoint
// volume, not the broker). After the reconnect it must find that it lost
// its tasks (its log says so: expelled from the group, fenced, or taken
// over) and the output it wrote while cut off never appears: the
// read_committed output is every input's count exactly once.
func TestNetworkPartition(t *testing.T) {
	s := newScenario(t, sluicetest.Options{})
	procs := s.start(3, shortGroupArgs()...)
	s.waitBalanced(procs...)
	s.startLoad(2, 50*time.Millisecond)
	for _, p := range procs {
		s.waitProgress(p, 50)
	}
	victim, others := procs[1], []*sluicetest.Processor{procs[0], procs[2]}
	linesBefore := len(logLines(victim.Logs(t)))
	outBefore := scrape(victim).Sum("sluice_records_out_total")

	victim.Disconnect(t)
	cut := time.Now()
	t.Logf("%s cut off the network with %d of its tasks", victim.Name, tasks/3)
	// The others take the victim's tasks over and go on.
	s.waitBalanced(others...)
	for _, p := range others {
		s.waitProgress(p, 50)
	}
	t.Logf("%s took the tasks over %s after the cut: %s", names(others), time.Since(cut).Round(100*time.Millisecond), assignment(others...))
	if rest := 4*shortSession - time.Since(cut); rest > 0 {
		time.Sleep(rest)
	}
	victim.Reconnect(t)
	t.Logf("%s reconnected after %s", victim.Name, time.Since(cut).Round(100*time.Millisecond))
	var outCut float64
	s.waitFor(30*time.Second, victim.Name+" answering /metrics again", func() bool {
		m := scrape(victim)
		outCut = m.Sum("sluice_records_out_total") - outBefore
		return m != nil
	}, nil)
	t.Logf("%s wrote %v output records while cut off; none of them may appear", victim.Name, outCut)

	// The zombie learns that it lost its tasks, and the group rebalances
	// over all three again.
	// (Which comes first, the group's verdict or the broker's fencing of
	// its producers, is a race of their retries after the reconnect.)
	evidence := []string{"tasks lost", "taken over", "fenced"}
	var found []string
	s.waitFor(90*time.Second, fmt.Sprintf("%s to log that it lost its tasks, was fenced or taken over", victim.Name), func() bool {
		found = found[:0]
		for _, l := range logLines(victim.Logs(t))[linesBefore:] {
			for _, e := range evidence {
				if strings.Contains(l.Msg, e) || strings.Contains(l.Err, e) {
					found = append(found, strings.TrimSuffix(l.Msg+": "+l.Err, ": "))
					break
				}
			}
		}
		return len(found) > 0
	}, nil)
	t.Logf("%s after the cut logged: %s", victim.Name, strings.Join(found[:min(len(found), 5)], " | "))
	s.waitBalanced(procs...)

	s.stopLoad()
	s.waitAllOutput(3 * time.Minute)
	for _, p := range procs {
		stopGracefully(t, p)
	}
	s.checkExactlyOnce()
}

// names lists the processors' names.
func names(ps []*sluicetest.Processor) string {
	var n []string
	for _, p := range ps {
		n = append(n, p.Name)
	}
	return strings.Join(n, " and ")
}
