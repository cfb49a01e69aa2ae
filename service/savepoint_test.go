package service_test

// Savepoint tests: the `savepoint` command against running instances (each
// its own service.Process with its own clients), stop-with-savepoint, an
// upgraded job restored with --from, and a restore after the input topic
// grew from 8 to 12 partitions. Verdicts come from a separate
// read_committed reader and kafkatest.CheckCounts (every key's counts are
// exactly 1..n in order, n its true count: the keyed state continued).

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/sluice-stream/sluice/coordinator"
	"github.com/sluice-stream/sluice/internal/example"
	"github.com/sluice-stream/sluice/internal/kafkatest"
	"github.com/sluice-stream/sluice/operators"
	"github.com/sluice-stream/sluice/service"
	"github.com/sluice-stream/sluice/state"
)

// upgradedCountJob is version 2 of the count job: the counting operator's
// code changed (it also remembers each key's last value in a new state)
// but keeps its uid and its count state, so a savepoint of version 1
// restores into it.
func upgradedCountJob(name, input, output string) *operators.Job {
	lastValue := state.NewValueState[string]("last-value", state.String)
	job := operators.NewJob(name)
	events := operators.FromKafka(job, input, operators.Strings)
	byKey := operators.KeyBy(events, func(m operators.Message) string { return m.Key }, state.String)
	counts := operators.Process(byKey, example.CountOperator, func(ctx *operators.Context[string], m operators.Message, out func(example.Count)) error {
		n, _, err := example.CountState.Get(ctx.State())
		if err != nil {
			return err
		}
		if err := example.CountState.Set(ctx.State(), n+1); err != nil {
			return err
		}
		if err := lastValue.Set(ctx.State(), m.Value); err != nil {
			return err
		}
		out(example.Count{Key: ctx.Key(), N: n + 1})
		return nil
	})
	operators.ToKafka(counts, output, func(c example.Count) ([]byte, []byte, error) {
		return []byte(c.Key), fmt.Appendf(nil, "%d", c.N), nil
	})
	return job
}

// hashedProducer writes records keyed from a fixed key set with Kafka's
// default partitioner (murmur2), counting them per key.
type hashedProducer struct {
	cl   *kgo.Client
	mu   sync.Mutex
	want map[string]int64
	n    int
}

func newHashedProducer(t *testing.T, addr, topic string) *hashedProducer {
	return &hashedProducer{cl: kafkatest.Client(t, addr, kgo.DefaultProduceTopic(topic)), want: map[string]int64{}}
}

func (p *hashedProducer) produce(t *testing.T, rounds int) {
	t.Helper()
	var recs []*kgo.Record
	p.mu.Lock()
	for range rounds {
		for k := range 40 {
			key := fmt.Sprintf("key-%02d", k)
			recs = append(recs, &kgo.Record{Key: []byte(key), Value: fmt.Appendf(nil, "%d", p.n)})
			p.want[key]++
			p.n++
		}
	}
	p.mu.Unlock()
	if err := p.cl.ProduceSync(context.Background(), recs...).FirstErr(); err != nil {
		t.Fatal(err)
	}
}

func (p *hashedProducer) total() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.n
}

// savepointTool runs the savepoint command and returns the location it
// printed.
func savepointTool(t *testing.T, args ...string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	if status := service.ToolCommand(append([]string{"savepoint"}, args...), &stdout, &stderr); status != 0 {
		t.Fatalf("savepoint %v: status %d\n%s", args, status, stderr.String())
	}
	t.Logf("savepoint command:\n%s", stderr.String())
	return strings.TrimSpace(stdout.String())
}

// waitStoppedByItself waits for an instance's Run to return without being
// cancelled, as after a stop-with-savepoint.
func waitStoppedByItself(t *testing.T, in *grpInstance) {
	t.Helper()
	select {
	case err := <-in.done:
		in.done <- err // for stop
		if err != nil {
			t.Fatalf("instance %s stopped with %v", in.name, err)
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("instance %s still runs 60s after the stop-with-savepoint", in.name)
	}
}

// TestSavepointStopUpgradeRestore: under continuous input, `savepoint
// --stop` stops both instances of the job on their own once every task
// wrote its part; input keeps arriving while the job is down; version 2 of
// the job restored from the savepoint on two new instances continues every
// key's count exactly. A restarted instance with the same --from does not
// import again.
func TestSavepointStopUpgradeRestore(t *testing.T) {
	e := newGrpEnv(t)
	pr := e.produce(20, 20*time.Millisecond)
	a := e.start(e.config("a", "classic"))
	b := e.start(e.config("b", "classic"))
	e.waitBalanced(a, b)
	e.waitProgress(a, 200)

	loc := savepointTool(t, "--job", grpJob, "--brokers", e.addr, "--checkpoint-dir", e.ckptDir, "--stop", "--timeout", "2m")
	waitStoppedByItself(t, a)
	waitStoppedByItself(t, b)
	sp, err := coordinator.LoadSavepoint(context.Background(), mustOpen(t, loc))
	if err != nil {
		t.Fatal(err)
	}
	if !sp.Stopped || sp.Partitions != grpTasks {
		t.Fatalf("savepoint %+v: want stopped with %d tasks", sp, grpTasks)
	}
	time.Sleep(200 * time.Millisecond) // input arrives while the job is down

	c1, c2 := e.config("c", "classic"), e.config("d", "classic")
	c1.From, c2.From = loc, loc
	c := e.startJob(upgradedCountJob(grpJob, grpInput, grpOutput), c1)
	d := e.startJob(upgradedCountJob(grpJob, grpInput, grpOutput), c2)
	e.waitBalanced(c, d)
	time.Sleep(300 * time.Millisecond)
	// d restarts with the same --from: its tasks resume, no import again.
	if err := d.stop(); err != nil {
		t.Fatal(err)
	}
	d2 := e.startJob(upgradedCountJob(grpJob, grpInput, grpOutput), c2)
	e.waitBalanced(c, d2)
	if err := pr.stop(); err != nil {
		t.Fatal(err)
	}
	e.waitOutput(60 * time.Second)
	e.checkExactlyOnce()
	if n := strings.Count(e.log.String(), "task imported"); n != grpTasks {
		t.Errorf("%d imports logged, want one per task (%d)", n, grpTasks)
	}
}

func mustOpen(t *testing.T, loc string) coordinator.Storage {
	t.Helper()
	st, err := coordinator.OpenStorage(context.Background(), loc, coordinator.StorageOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// TestSavepointRestoreWithMorePartitions: a savepoint of a job reading 8
// partitions is restored after the input grew to 12: each key's state is
// re-split to the task that now receives the key (murmur2), so every
// key's count continues exactly, and `state dump` shows every key's count.
func TestSavepointRestoreWithMorePartitions(t *testing.T) {
	e := newGrpEnvParts(t, 8)
	addr := e.addr
	pr := newHashedProducer(t, addr, grpInput)
	pr.produce(t, 5)
	a := e.start(e.config("a", "classic"))
	grpWait(t, 60*time.Second, "phase 1 processed", func() bool { return a.recordsIn() == int64(pr.total()) })
	loc := savepointTool(t, "--job", grpJob, "--brokers", addr, "--checkpoint-dir", e.ckptDir, "--stop")
	waitStoppedByItself(t, a)

	adm := kadm.NewClient(kafkatest.Client(t, addr))
	if _, err := adm.CreatePartitions(context.Background(), 4, grpInput); err != nil {
		t.Fatal(err)
	}
	c := e.config("b", "classic")
	c.From = loc
	b := e.startJob(example.CountJob(grpJob, grpInput, grpOutput), c)
	pr2 := newHashedProducer(t, addr, grpInput) // fresh metadata: 12 partitions
	pr2.n, pr2.want = pr.n, pr.want
	pr2.produce(t, 4)
	grpWait(t, 60*time.Second, "phase 2 processed", func() bool { return b.recordsIn() == int64(pr2.total()-pr.total()) })
	// Processed is not yet committed: wait until the output is all there.
	var out []*kgo.Record
	grpWait(t, 60*time.Second, "phase 2 output committed", func() bool {
		out = kafkatest.ReadCommitted(t, addr, grpOutput, 8, 60*time.Second)
		return len(out) >= pr2.total()
	})
	kafkatest.CheckCounts(t, out, pr2.want)
	if len(b.p.Instance.Tasks()) != 12 {
		t.Errorf("instance runs tasks %v, want 12", b.p.Instance.Tasks())
	}

	// The savepoint itself, through the State Processor tool.
	var stdout, stderr bytes.Buffer
	if st := service.ToolCommand([]string{"state", "dump", "--from", loc, "--value", "int64"}, &stdout, &stderr); st != 0 {
		t.Fatalf("state dump: %d\n%s", st, stderr.String())
	}
	for k := range 40 {
		line := fmt.Sprintf(`"operator":"count","state":"count","key":"key-%02d","value":5}`, k)
		if !strings.Contains(stdout.String(), line) {
			t.Fatalf("state dump lacks %s:\n%s", line, stdout.String())
		}
	}
}
