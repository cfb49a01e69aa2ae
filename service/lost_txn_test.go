package service_test

// Lost-transaction tests (issue 4): a pre-committed transaction of a complete
// checkpoint is aborted at the broker before the job commits it. The next
// owner of the task must find it lost through its progress marker, roll the
// task back to the newest fully committed checkpoint and replay, suppressing
// output that is already committed: every input's output exactly once.
//
// The broker is cmd/broker (kfake) as a child process with a data folder,
// so it can be killed with SIGKILL and restarted like a real broker. kfake
// aborts the transactions open at a crash when it loads its data again;
// cmd/broker adds the ABORT control records kfake leaves out, without which
// the sink could never decide those transactions and read_committed readers
// would miss later committed output of the same producers.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/sluice-stream/sluice/coordinator"
	"github.com/sluice-stream/sluice/internal/example"
	"github.com/sluice-stream/sluice/internal/kafkatest"
	"github.com/sluice-stream/sluice/service"
)

const (
	lostIn         = "in"
	lostOut        = "out"
	lostPartitions = 4
)

// lostSeed picks the crash points; SLUICE_TEST_SEED overrides it to explore.
func lostSeed(t *testing.T) uint64 {
	seed := uint64(20260918)
	if s := os.Getenv("SLUICE_TEST_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("SLUICE_TEST_SEED=%q: %v", s, err)
		}
		seed = v
	}
	t.Logf("seed %d (set SLUICE_TEST_SEED to change)", seed)
	return seed
}

// TestLostTxnBrokerKill kills the broker (SIGKILL) right after a checkpoint
// of a task completed and before its transaction is committed, several times
// at seeded checkpoints. kfake aborts every open transaction when it loads
// its data after a crash, so the checkpoint's pre-committed transaction is
// lost; the task restarts and its takeover must detect that and replay.
func TestLostTxnBrokerKill(t *testing.T) {
	const job, crashes = "lost-kill", 3
	rng := rand.New(rand.NewPCG(lostSeed(t), 1))
	dir := testDir(t)
	broker := kafkatest.StartBrokerProcess(t, kafkatest.BuildBroker(t), filepath.Join(dir, "broker"))
	kafkatest.CreateTopics(t, broker.Addr, lostPartitions, lostIn, lostOut)
	storage := newStorage(t, dir)

	type crash struct {
		task  int32
		after int // complete checkpoints of the task to let pass first
	}
	var plan []crash
	for range crashes {
		plan = append(plan, crash{task: rng.Int32N(lostPartitions), after: 1 + rng.IntN(4)})
	}
	t.Logf("crash plan (task, checkpoints to let pass): %v", plan)

	// The input producer holds produceMu around each produce and the crash
	// holds it around the kill, so no produce is in flight when the broker
	// dies: acknowledged input is never in doubt.
	var produceMu sync.Mutex
	var (
		hookMu   sync.Mutex
		next     int
		seen     int
		crashed  []lostEvent // task and checkpoint of each crash
		hookErr  error
		planDone = make(chan struct{})
	)
	hook := func(task int32, step coordinator.Step, id int64) error {
		if step != coordinator.StepMetadataCreated {
			return nil
		}
		hookMu.Lock()
		defer hookMu.Unlock()
		if next >= len(plan) || task != plan[next].task {
			return nil
		}
		if seen++; seen <= plan[next].after || !carriesOutput(storage, job, task, id) {
			return nil
		}
		produceMu.Lock()
		defer produceMu.Unlock()
		if err := broker.Kill(); err != nil {
			hookErr = errors.Join(hookErr, err)
		}
		if err := broker.Restart(); err != nil {
			hookErr = errors.Join(hookErr, err)
		}
		crashed = append(crashed, lostEvent{Task: task, Checkpoint: id})
		next, seen = next+1, 0
		if next == len(plan) {
			close(planDone)
		}
		return coordinator.ErrCrash
	}

	logs := &logCapture{}
	p := startJob(t, job, broker.Addr, dir, "kill-1", hook, nil, logs)
	run := runJob(t, p)

	// Input arrives while the job runs, in small rounds, until every crash
	// happened and a few rounds more.
	prod := kafkatest.Client(t, broker.Addr, kgo.RecordPartitioner(kgo.ManualPartitioner()), kgo.DefaultProduceTopic(lostIn))
	in := newInput()
	deadline := time.Now().Add(60 * time.Second)
	for extra := 0; extra < 10; {
		select {
		case <-planDone:
			extra++
		default:
			if time.Now().After(deadline) {
				hookMu.Lock()
				n := len(crashed)
				hookMu.Unlock()
				t.Fatalf("only %d of %d crashes happened within 60s\n%s", n, crashes, logs.tail(40))
			}
		}
		produceMu.Lock()
		err := in.produceRound(prod, 5)
		produceMu.Unlock()
		if err != nil {
			t.Fatalf("produce input: %v", err)
		}
		time.Sleep(20 * time.Millisecond) // pacing only: the load's shape
	}
	waitCommitted(t, p, storage, job, in.ends(), logs)
	run.stop(t)

	hookMu.Lock()
	if hookErr != nil {
		t.Fatalf("broker kill/restart in the hook: %v", hookErr)
	}
	crashedCopy := append([]lostEvent(nil), crashed...)
	hookMu.Unlock()
	t.Logf("broker killed after checkpoints (task/checkpoint) %v; %d input records", crashedCopy, in.total())
	assertLostDetected(t, logs, crashedCopy)

	out := kafkatest.ReadCommitted(t, broker.Addr, lostOut, lostPartitions, 30*time.Second)
	kafkatest.CheckExactlyOnceInOrder(t, out, in.want)
}

// TestLostTxnTimeoutWhileDown stops the whole job right after a checkpoint of
// a task completed and before its transaction is committed, without any
// final checkpoint (every task freezes at its next protocol step, like a
// stopped process, then is cancelled), keeps it down until the broker's
// transaction timeout aborted the transaction, then starts a new process:
// its takeover must find the transaction lost, roll back and replay.
func TestLostTxnTimeoutWhileDown(t *testing.T) {
	const job = "lost-timeout"
	rng := rand.New(rand.NewPCG(lostSeed(t), 2))
	dir := testDir(t)
	broker := kafkatest.StartBrokerProcess(t, kafkatest.BuildBroker(t), filepath.Join(dir, "broker"),
		"--broker-config", "transaction.max.timeout.ms=2000")
	kafkatest.CreateTopics(t, broker.Addr, lostPartitions, lostIn, lostOut)
	storage := newStorage(t, dir)
	target := rng.Int32N(lostPartitions)
	after := 1 + rng.IntN(4)
	t.Logf("freezing the job after %d complete checkpoints of task %d", after, target)

	var (
		frozen   atomic.Bool
		seen     atomic.Int32
		lost     lostEvent
		frozenCh = make(chan struct{})
	)
	runCtx, cancelRun := context.WithCancel(context.Background())
	defer cancelRun()
	hook := func(task int32, step coordinator.Step, id int64) error {
		if frozen.Load() {
			<-runCtx.Done()
			return coordinator.ErrCrash
		}
		if step != coordinator.StepMetadataCreated || task != target {
			return nil
		}
		if int(seen.Add(1)) <= after || !carriesOutput(storage, job, task, id) {
			return nil
		}
		if frozen.CompareAndSwap(false, true) {
			lost = lostEvent{Task: task, Checkpoint: id}
			close(frozenCh)
		}
		<-runCtx.Done()
		return coordinator.ErrCrash
	}

	logs1 := &logCapture{}
	p1 := startJob(t, job, broker.Addr, dir, "timeout-1", hook, func(c *service.Config) {
		c.TransactionTimeout = 2 * time.Second
	}, logs1)
	run1 := runJobCtx(t, p1, runCtx, cancelRun)

	prod := kafkatest.Client(t, broker.Addr, kgo.RecordPartitioner(kgo.ManualPartitioner()), kgo.DefaultProduceTopic(lostIn))
	in := newInput()
	deadline := time.Now().Add(30 * time.Second)
	for done := false; !done; {
		select {
		case <-frozenCh:
			done = true
		default:
			if time.Now().After(deadline) {
				t.Fatalf("task %d did not complete %d checkpoints carrying output within 30s\n%s", target, after+1, logs1.tail(40))
			}
		}
		if err := in.produceRound(prod, 5); err != nil {
			t.Fatalf("produce input: %v", err)
		}
		time.Sleep(20 * time.Millisecond) // pacing only
	}
	run1.stop(t) // cancels: every frozen step returns a crash, no final checkpoint
	for _, line := range logs1.lines() {
		if strings.Contains(line, "task stopped after final checkpoint") {
			t.Fatalf("a task took a final checkpoint: the job did not go down like a crash: %s", line)
		}
	}
	t.Logf("job down after checkpoint %d of task %d completed, its transaction uncommitted", lost.Checkpoint, lost.Task)

	// The job is down. Its pending transaction must be aborted by the
	// broker's timeout before the job comes back.
	c, err := coordinator.LoadCheckpoint(context.Background(), storage, job, lost.Task, lost.Checkpoint)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Pending) == 0 {
		t.Fatalf("checkpoint %d of task %d lists no pending transaction", lost.Checkpoint, lost.Task)
	}
	var ids []string
	for _, pt := range c.Pending {
		ids = append(ids, pt.Committable.TransactionalID)
	}
	waitNotOngoing(t, broker.Addr, ids, 20*time.Second)
	// Input produced while the job is down.
	for range 5 {
		if err := in.produceRound(prod, 5); err != nil {
			t.Fatalf("produce input: %v", err)
		}
	}

	logs2 := &logCapture{}
	p2 := startJob(t, job, broker.Addr, dir, "timeout-2", nil, func(c *service.Config) {
		c.TransactionTimeout = 2 * time.Second
	}, logs2)
	run2 := runJob(t, p2)
	waitCommitted(t, p2, storage, job, in.ends(), logs2)
	run2.stop(t)

	assertLostDetected(t, logs2, []lostEvent{lost})
	out := kafkatest.ReadCommitted(t, broker.Addr, lostOut, lostPartitions, 30*time.Second)
	kafkatest.CheckExactlyOnceInOrder(t, out, in.want)
}

// testDir is the test's folder for broker data, checkpoints and state: a
// temporary one, or with SLUICE_TEST_KEEP=<dir> one kept under dir for a
// look after the test.
func testDir(t *testing.T) string {
	keep := os.Getenv("SLUICE_TEST_KEEP")
	if keep == "" {
		return t.TempDir()
	}
	dir, err := os.MkdirTemp(keep, t.Name()+"-")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("test data kept in %s", dir)
	return dir
}

// startJob starts the count job from in to out with checkpoints, work
// folder and broker data under dir.
func startJob(t *testing.T, job, addr, dir, instance string, hook coordinator.Hook, edit func(*service.Config), logs *logCapture) *service.Process {
	t.Helper()
	c := service.DefaultConfig()
	c.Brokers = []string{addr}
	c.CheckpointDir = filepath.Join(dir, "checkpoints")
	c.WorkDir = filepath.Join(dir, "work-"+instance)
	c.InstanceID = instance
	c.Hook = hook
	c.Settings.Interval = 100 * time.Millisecond
	c.Settings.Timeout = 10 * time.Second
	c.Settings.StopTimeout = 10 * time.Second
	// This instance runs every task: the takeovers under test follow
	// crashes, not rebalances.
	c.GroupProtocol = "none"
	if edit != nil {
		edit(&c)
	}
	log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if d := os.Getenv("SLUICE_TEST_LOGS"); d != "" {
		// Keep the whole log for a look after the test.
		t.Cleanup(func() {
			name := filepath.Join(d, t.Name()+"-"+instance+".log")
			if err := os.WriteFile(name, []byte(strings.Join(logs.lines(), "\n")+"\n"), 0o644); err != nil {
				t.Log(err)
			}
		})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p, err := service.Start(ctx, example.CountJob(job, lostIn, lostOut), c, log)
	if err != nil {
		t.Fatalf("start job: %v", err)
	}
	t.Cleanup(p.Close)
	return p
}

// running is a Process.Run in progress.
type running struct {
	cancel context.CancelFunc
	done   chan error
}

func runJob(t *testing.T, p *service.Process) *running {
	ctx, cancel := context.WithCancel(context.Background())
	return runJobCtx(t, p, ctx, cancel)
}

func runJobCtx(t *testing.T, p *service.Process, ctx context.Context, cancel context.CancelFunc) *running {
	r := &running{cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- p.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.done:
		case <-time.After(30 * time.Second):
			t.Error("job run did not return within 30s of its cancellation")
		}
	})
	return r
}

// stop cancels the run and waits for it (final checkpoints unless a hook
// crashes them).
func (r *running) stop(t *testing.T) {
	t.Helper()
	r.cancel()
	select {
	case err := <-r.done:
		r.done <- err // for the cleanup
		if err != nil {
			t.Fatalf("job run: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("job did not stop within 30s of its cancellation")
	}
}

func newStorage(t *testing.T, dir string) coordinator.Storage {
	t.Helper()
	st, err := coordinator.NewLocalStorage(filepath.Join(dir, "checkpoints"))
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// carriesOutput reports whether checkpoint id of task has a pending
// transaction with input behind it (output records, not only the marker)
// and follows committed output: a crash there loses output that must be
// replayed on top of output that must not be repeated.
func carriesOutput(st coordinator.Storage, job string, task int32, id int64) bool {
	c, err := coordinator.LoadCheckpoint(context.Background(), st, job, task, id)
	if err != nil || len(c.Pending) == 0 {
		return false
	}
	committed := c.CommittedOffsets[lostIn]
	return committed > 0 && c.Offsets[lostIn] > committed
}

// input is the keyed input produced so far.
type input struct {
	next []int // next record index per partition
	want map[string]int64
}

func newInput() *input { return &input{next: make([]int, lostPartitions), want: map[string]int64{}} }

// produceRound appends n records to every partition.
func (in *input) produceRound(cl *kgo.Client, n int) error {
	var recs []*kgo.Record
	for p := range int32(lostPartitions) {
		for range n {
			i := in.next[p]
			in.next[p]++
			k := kafkatest.Key(p, i)
			in.want[k]++
			recs = append(recs, &kgo.Record{Partition: p, Key: []byte(k), Value: []byte(strconv.Itoa(i))})
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	return cl.ProduceSync(ctx, recs...).FirstErr()
}

// ends are the end offsets of the input partitions (one topic, no
// transactions: offsets are the record indexes).
func (in *input) ends() map[int32]int64 {
	m := map[int32]int64{}
	for p, n := range in.next {
		m[int32(p)] = int64(n)
	}
	return m
}

func (in *input) total() (n int) {
	for _, v := range in.next {
		n += v
	}
	return n
}

// waitCommitted waits until every task has a committed checkpoint at the end
// of its input.
func waitCommitted(t *testing.T, p *service.Process, st coordinator.Storage, job string, ends map[int32]int64, logs *logCapture) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		stats := p.Instance.Stats() // tasks appear once assigned
		behind := map[int32]int64{}
		for task, end := range ends {
			at := int64(-1)
			if ts := stats[task]; ts != nil && ts.LastCheckpointID.Load() > 0 {
				id := ts.LastCheckpointID.Load()
				// The newest committed checkpoint; retention may have
				// just replaced it by a newer one: read again next time.
				if c, err := coordinator.LoadCheckpoint(context.Background(), st, job, task, id); err == nil {
					at = c.Offsets[lostIn]
				}
			}
			if at < end {
				behind[task] = at
			}
		}
		if len(behind) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("within 60s, tasks did not commit a checkpoint at the end of their input (task: committed offset) %v, ends %v\n%s", behind, ends, logs.tail(60))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitNotOngoing waits until the broker reports none of the transactional
// ids with an ongoing transaction.
func waitNotOngoing(t *testing.T, addr string, ids []string, timeout time.Duration) {
	t.Helper()
	adm := kadm.NewClient(kafkatest.Client(t, addr))
	deadline := time.Now().Add(timeout)
	var last string
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		dts, err := adm.DescribeTransactions(ctx, ids...)
		cancel()
		ongoing := false
		if err != nil {
			last, ongoing = err.Error(), true
		} else {
			var states []string
			for _, id := range ids {
				d, ok := dts[id]
				switch {
				case !ok:
					states = append(states, id+": not described")
					ongoing = true
				case d.Err != nil:
					states = append(states, fmt.Sprintf("%s: %v", id, d.Err))
					ongoing = true
				default:
					states = append(states, fmt.Sprintf("%s: %s (producer %d epoch %d)", id, d.State, d.ProducerID, d.ProducerEpoch))
					ongoing = ongoing || d.State == "Ongoing"
				}
			}
			last = strings.Join(states, ", ")
		}
		if !ongoing {
			t.Logf("transactions after the broker's timeout: %s", last)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("transactions still ongoing after %s: %s", timeout, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// lostEvent is a task's checkpoint whose transaction was lost.
type lostEvent struct {
	Task       int32 `json:"task"`
	Checkpoint int64 `json:"lost_checkpoint"`
}

// assertLostDetected checks that for every expected loss the task logged
// TRANSACTION LOST for that checkpoint or an earlier one (an earlier pending
// transaction of the same checkpoint is lost first).
func assertLostDetected(t *testing.T, logs *logCapture, want []lostEvent) {
	t.Helper()
	got := logs.lost()
	t.Logf("TRANSACTION LOST logged for (task, checkpoint) %v", got)
	for _, w := range want {
		found := false
		for _, g := range got {
			if g.Task == w.Task && g.Checkpoint <= w.Checkpoint {
				found = true
			}
		}
		if !found {
			t.Errorf("task %d: no TRANSACTION LOST logged for checkpoint %d (lost path not taken)\n%s", w.Task, w.Checkpoint, logs.tail(60))
		}
	}
}

// logCapture collects a job's JSON logs.
type logCapture struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logCapture) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logCapture) lines() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	sc := bufio.NewScanner(bytes.NewReader(l.buf.Bytes()))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		out = append(out, sc.Text())
	}
	return out
}

// lost returns the TRANSACTION LOST events logged.
func (l *logCapture) lost() []lostEvent {
	var out []lostEvent
	for _, line := range l.lines() {
		if !strings.Contains(line, "TRANSACTION LOST") {
			continue
		}
		var e lostEvent
		if json.Unmarshal([]byte(line), &e) == nil {
			out = append(out, e)
		}
	}
	return out
}

// tail returns the last n lines, for failure messages.
func (l *logCapture) tail(n int) string {
	lines := l.lines()
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
