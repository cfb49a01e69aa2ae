package integration

import (
	"context"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"

	"github.com/sluice-stream/sluice/integration/sluicetest"
)

// TestBrokerKill kills the broker container with SIGKILL while the job's
// transactions are open, under load, and starts it again on its data
// volume. kfake then aborts every transaction that was open (cmd/broker
// writes the ABORT markers kfake omits): pre-committed transactions of
// checkpoints that complete meanwhile, in the checkpoint storage, are lost
// at the broker. The processors must detect that through their progress
// markers, roll back and replay ("TRANSACTION LOST" in their logs), so that
// nothing is lost and nothing doubled (kcat and a Go reader). The kill is
// repeated (at most 5 times) until a processor reports a lost transaction.
//
// The input is held around each kill so that no produce is in flight when
// the broker dies: acknowledged input is never in doubt. (With a real
// Kafka image the broker keeps open transactions across a crash until
// their timeout; the job then just commits them and the lost path may not
// run, which the test accepts there.)
func TestBrokerKill(t *testing.T) {
	s := newScenario(t, sluicetest.Options{})
	// Checkpoints every 50 ms: a transaction is lost at the kill when its
	// checkpoint completed in storage but was not committed yet, a window
	// of the storage write (milliseconds) per checkpoint interval; short
	// intervals make it likely enough that some task of 6 is in it.
	procs := s.start(2, "--interval", "50ms")
	s.waitBalanced(procs...)
	s.startLoad(2, 50*time.Millisecond)
	for _, p := range procs {
		s.waitProgress(p, 50)
	}
	adm := kadm.NewClient(s.env.Client(t))

	lost := 0
	const maxKills = 5
	for kill := 1; kill <= maxKills && lost == 0; kill++ {
		open := s.pauseWithOpenTransactions(adm)
		s.env.Broker.Kill(t)
		t.Logf("broker killed (SIGKILL) with %d open transactions %v, %d input records, %d outputs committed",
			len(open), open, s.stream.Total(), s.out.Len())
		time.Sleep(2 * time.Second) // the processors find the broker gone
		s.env.Broker.Start(t)
		s.load.resume()
		// Recovered: the output grows again.
		before := s.out.Len()
		s.out.WaitLen(t, before+500, 2*time.Minute)
		for _, p := range procs {
			lost += countLines(logLines(p.Logs(t)), "TRANSACTION LOST")
		}
		t.Logf("after broker restart %d: output grows again; %d lost transactions detected so far", kill, lost)
	}
	if lost == 0 && !s.env.Broker.Real {
		t.Fatalf("no processor detected a lost transaction after %d broker kills mid-transaction: the lost-transaction path was not exercised", maxKills)
	}

	s.waitBalanced(procs...)
	s.stopLoad()
	s.waitAllOutput(3 * time.Minute)
	for _, p := range procs {
		stopGracefully(t, p)
	}
	s.checkExactlyOnceKcat()
	s.checkExactlyOnce()
}

// pauseWithOpenTransactions holds the input at a moment when the broker
// lists open transactions (Ongoing, or a commit or abort not finished), and
// returns their transactional ids; it tries for 20 s.
func (s *scenario) pauseWithOpenTransactions(adm *kadm.Client) []string {
	s.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		s.load.pause()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		txns, err := adm.ListTransactions(ctx, nil, []string{"Ongoing", "PrepareCommit", "PrepareAbort"})
		cancel()
		var open []string
		if err == nil {
			for _, tx := range txns.Sorted() {
				open = append(open, tx.TxnID)
			}
		}
		if len(open) > 0 {
			return open
		}
		s.load.resume()
		if time.Now().After(deadline) {
			s.t.Fatalf("no open transaction to kill the broker in within 20s (last error %v)", err)
		}
		time.Sleep(30 * time.Millisecond)
	}
}
