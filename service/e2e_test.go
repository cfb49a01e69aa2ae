package service_test

// End-to-end tests of the whole process on an in-process Kafka (kfake): the
// real Kafka source, the real exactly-once Kafka sink, Pebble state and a
// local checkpoint folder, wired by service.Start. Faults are injected
// deterministically through service.Config.Hook (coordinator.ErrCrash
// crashes a task at a protocol step; the instance restarts it and the
// takeover recovers it) and coordinator.FaultyStorage. Every verdict comes
// from readers that share nothing with the job: a read_committed Kafka
// consumer (kafkatest.ReadCommitted + CheckCounts), the checkpoint folder as
// a restore would read it, kadm, and kcat.
//
// Shared helpers live in this file and e2e_kafka_test.go; each scenario has
// its own file. To debug a failure: SLUICE_E2E_LOG=1 streams the job's log
// to stderr; SLUICE_E2E_DUMP=<dir> writes each test's log and the raw output
// and progress topics (control records included) under <dir>/<test>/.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"go.uber.org/goleak"

	"github.com/sluice-stream/sluice/coordinator"
	"github.com/sluice-stream/sluice/internal/example"
	"github.com/sluice-stream/sluice/internal/kafkatest"
	"github.com/sluice-stream/sluice/service"
	"github.com/sluice-stream/sluice/state"
)

const (
	e2eJob    = "counts"
	e2eInput  = "events"
	e2eOutput = "counts"
	// e2eProgress is the sink's default progress topic of the job.
	e2eProgress = e2eJob + "-progress"
)

// e2eSeed returns the seed of a test's fault plan: def, or
// SLUICE_TEST_SEED plus def when that is set (to explore other plans; the
// seed is logged so a failure can be replayed).
func e2eSeed(t *testing.T, def uint64) uint64 {
	t.Helper()
	seed := def
	if s := os.Getenv("SLUICE_TEST_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("SLUICE_TEST_SEED=%q: %v", s, err)
		}
		seed += v
	}
	t.Logf("seed %d (SLUICE_TEST_SEED shifts it)", seed)
	return seed
}

// e2eEnv is one test's Kafka with the job's input and output topics.
type e2eEnv struct {
	addr    string
	cluster *kfake.Cluster
	parts   int32
	ckptDir string
	workDir string
}

func newE2EEnv(t *testing.T, parts int32, opts ...kfake.Opt) *e2eEnv {
	t.Helper()
	addr, cluster := kafkatest.Start(t, opts...)
	kafkatest.CreateTopics(t, addr, parts, e2eInput, e2eOutput)
	return &e2eEnv{addr: addr, cluster: cluster, parts: parts, ckptDir: t.TempDir(), workDir: t.TempDir()}
}

// config is the job's configuration for tests: short checkpoint interval,
// Pebble state, exactly-once sink.
func (e *e2eEnv) config() service.Config {
	c := service.DefaultConfig()
	c.Brokers = []string{e.addr}
	c.CheckpointDir = e.ckptDir
	c.WorkDir = e.workDir
	c.InstanceID = "e2e"
	c.StateCacheBytes = 8 << 20
	c.TransactionTimeout = time.Minute
	c.ConnectTimeout = 10 * time.Second
	c.Settings.Interval = 30 * time.Millisecond
	c.Settings.Retained = 2
	c.Settings.StopTimeout = 20 * time.Second
	return c
}

// e2eRun is one running service.Process.
type e2eRun struct {
	p      *service.Process
	cancel context.CancelFunc
	done   chan error
}

// e2eStart starts the count job with c; it is stopped with the test if the
// test does not stop it.
func e2eStart(t *testing.T, c service.Config, log *slog.Logger) *e2eRun {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	p, err := service.Start(ctx, example.CountJob(e2eJob, e2eInput, e2eOutput), c, log)
	if err != nil {
		cancel()
		t.Fatalf("start job: %v", err)
	}
	j := &e2eRun{p: p, cancel: cancel, done: make(chan error, 1)}
	go func() { j.done <- p.Run(ctx) }()
	t.Cleanup(func() { _ = j.stop() })
	return j
}

// stats returns the counters of task, waiting until the task is assigned
// (with a consumer group, assignment follows the join).
func (j *e2eRun) stats(t *testing.T, task int32) *coordinator.TaskStats {
	t.Helper()
	var st *coordinator.TaskStats
	e2eWaitFor(t, 30*time.Second, fmt.Sprintf("task %d assigned", task), func() bool {
		st = j.p.Instance.Stats()[task]
		return st != nil
	})
	return st
}

// stop stops the job gracefully (final checkpoint and commit) and returns
// what Run returned. Stopping twice returns nil.
func (j *e2eRun) stop() error {
	if j.p == nil {
		return nil
	}
	j.cancel()
	err := <-j.done
	j.p.Close()
	j.p = nil
	return err
}

// e2eLogger collects the job's log; it is printed (the tail) if the test
// fails, or streamed to stderr with SLUICE_E2E_LOG=1.
func e2eLogger(t *testing.T) *slog.Logger {
	log, _ := e2eLoggerBuf(t)
	return log
}

// e2eLoggerBuf is e2eLogger that also returns the collected log.
func e2eLoggerBuf(t *testing.T) (*slog.Logger, *kafkatest.LogBuffer) {
	buf := &kafkatest.LogBuffer{}
	if d := os.Getenv("SLUICE_E2E_DUMP"); d != "" {
		d = d + "/" + strings.ReplaceAll(t.Name(), "/", "_")
		_ = os.MkdirAll(d, 0o755)
		f, err := os.Create(d + "/log.txt")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return slog.New(slog.NewTextHandler(io.MultiWriter(f, buf), &slog.HandlerOptions{Level: slog.LevelDebug})), buf
	}
	if os.Getenv("SLUICE_E2E_LOG") != "" {
		return slog.New(slog.NewTextHandler(io.MultiWriter(os.Stderr, buf), &slog.HandlerOptions{Level: slog.LevelDebug})), buf
	}
	t.Cleanup(func() {
		if t.Failed() {
			s := buf.String()
			if len(s) > 64<<10 {
				s = "...\n" + s[len(s)-64<<10:]
			}
			t.Logf("job log (tail):\n%s", s)
		}
	})
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelInfo})), buf
}

// e2eNoLeaks makes the test fail if goroutines it started outlive it (kfake,
// the job's clients, Pebble, the sink's producers). Call it first: its
// check then runs after every other cleanup.
func e2eNoLeaks(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) })
}

// e2eWaitFor polls cond until it holds; past the deadline the test fails.
func e2eWaitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// e2eWaitOutput reads the output topic with read_committed from the start
// until every input of stream has its output visible. More than that is a
// duplicate and fails at once. If the output stays short past d, the exact
// check says what is missing.
func e2eWaitOutput(t *testing.T, e *e2eEnv, stream *kafkatest.Stream, d time.Duration) {
	t.Helper()
	total := stream.Total()
	cl := kafkatest.Client(t, e.addr, kgo.ConsumeTopics(e2eOutput), kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	n := 0
	for n < total {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Errorf("only %d of %d outputs visible to read_committed after %s", n, total, d)
			e2eCheckExactlyOnce(t, e, stream.Want())
			t.FailNow()
		}
		fs.EachRecord(func(r *kgo.Record) {
			if string(r.Key) != kafkatest.SentinelKey {
				n++
			}
		})
		if n > total {
			t.Fatalf("%d outputs visible to read_committed for %d inputs: duplicates", n, total)
		}
	}
}

// e2eCheckExactlyOnce is the verdict on the output: a separate read_committed
// reader reads every output partition to its end, and every key's counts
// must be 1..n in order, each exactly once.
func e2eCheckExactlyOnce(t *testing.T, e *e2eEnv, want map[string]int64) {
	t.Helper()
	if d := os.Getenv("SLUICE_E2E_DUMP"); d != "" {
		d = d + "/" + strings.ReplaceAll(t.Name(), "/", "_")
		e2eDumpRaw(t, e.addr, e2eOutput, d+"/out.txt")
		e2eDumpRaw(t, e.addr, e2eProgress, d+"/progress.txt")
	}
	out := kafkatest.ReadCommitted(t, e.addr, e2eOutput, e.parts, 30*time.Second)
	if e2eCheckOnceThenOrder(t, out, want) {
		kafkatest.CheckCounts(t, out, want)
	}
}

// e2eCheckOnceThenOrder tells the two ways the output can be wrong apart
// before kafkatest.CheckCounts gives the verdict: first every count 1..n of
// every key must be there exactly once (nothing lost, nothing doubled), then
// in order (a count visible before a smaller one of the same key, in the
// same partition, is an ordering violation; the message gives both
// positions). Loss and duplicates stop the test; an ordering violation is
// reported and the test goes on to its other checks. It returns whether
// all was well.
func e2eCheckOnceThenOrder(t *testing.T, out []*kgo.Record, want map[string]int64) bool {
	t.Helper()
	seen := map[string]map[int64]*kgo.Record{}
	for _, r := range out {
		k := string(r.Key)
		n, err := strconv.ParseInt(string(r.Value), 10, 64)
		if err != nil {
			t.Fatalf("output %q=%q at %d@%d is not a count", r.Key, r.Value, r.Partition, r.Offset)
		}
		if seen[k] == nil {
			seen[k] = map[int64]*kgo.Record{}
		}
		if prev := seen[k][n]; prev != nil {
			t.Fatalf("key %s: count %d is visible twice (%d@%d and %d@%d): duplicate output", k, n, prev.Partition, prev.Offset, r.Partition, r.Offset)
		}
		seen[k][n] = r
	}
	for k, n := range want {
		for i := int64(1); i <= n; i++ {
			if seen[k][i] == nil {
				t.Fatalf("key %s: count %d of %d is not visible: output lost", k, i, n)
			}
		}
		if extra := int64(len(seen[k])) - n; extra > 0 {
			t.Fatalf("key %s: %d counts beyond the %d inputs: output for input that does not exist", k, extra, n)
		}
	}
	for k, byN := range seen {
		for n := int64(2); n <= int64(len(byN)); n++ {
			a, b := byN[n-1], byN[n]
			if a.Partition == b.Partition && a.Offset > b.Offset {
				t.Errorf("key %s: exactly once, but OUT OF ORDER: count %d at %s/%d@%d (producer %d epoch %d) is before count %d at @%d (producer %d epoch %d)",
					k, n, e2eOutput, b.Partition, b.Offset, b.ProducerID, b.ProducerEpoch, n-1, a.Offset, a.ProducerID, a.ProducerEpoch)
				return false
			}
		}
	}
	return true
}

// e2eCheckFinalState restores every task's newest checkpoint from the
// checkpoint folder, as a restarted task would, and checks that it covers
// the whole input (offsets) and that its keyed state holds exactly the true
// count of every key.
func e2eCheckFinalState(t *testing.T, st coordinator.Storage, parts int32, perPartition int64, want map[string]int64) {
	t.Helper()
	ctx := context.Background()
	pf := state.NewPebbleFactory(8 << 20)
	defer pf.Close()
	for p := range parts {
		ids, err := coordinator.ListCheckpointIDs(ctx, st, e2eJob, p)
		if err != nil || len(ids) == 0 {
			t.Fatalf("task %d: no complete checkpoint (%v)", p, err)
		}
		c, err := coordinator.LoadCheckpoint(ctx, st, e2eJob, p, ids[0])
		if err != nil {
			t.Fatal(err)
		}
		if got := c.Offsets[e2eInput]; got != perPartition {
			t.Fatalf("task %d: newest checkpoint %d is at offset %d, want the end of the input %d", p, c.ID, got, perPartition)
		}
		store, err := coordinator.OpenCheckpointState(ctx, st, pf, c, t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		kafkatest.CheckCountState(t, store, p, want)
		if err := store.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// e2eLocalStorage opens the checkpoint folder the way a new process would.
func e2eLocalStorage(t *testing.T, dir string) coordinator.Storage {
	t.Helper()
	st, err := coordinator.NewLocalStorage(dir)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// e2eFeed produces the input as a live stream: batch records per partition
// every tick, at least min per partition, and then on until more() says
// stop (the fault plan is through) or max per partition is reached. Crashes
// therefore land while records flow, and scheduled crashes at records
// always find records. It returns when it stopped producing.
func e2eFeed(t *testing.T, s *kafkatest.Stream, batch, min, max int, tick time.Duration, more func() bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	tk := time.NewTicker(tick)
	defer tk.Stop()
	for n := 0; n < max && (n < min || more()); n += batch {
		if err := s.Produce(ctx, batch); err != nil {
			t.Fatalf("produce input: %v", err)
		}
		select {
		case <-tk.C:
		case <-ctx.Done():
			t.Fatal("feeding input took too long")
		}
	}
}

// e2eCrashPoint is one scheduled crash of a task: at the (skip+1)-th
// occurrence of step after the previous crash of the task.
type e2eCrashPoint struct {
	step coordinator.Step
	skip int
	// between: StepTxnCommitted counts only when more commits of the same
	// completion follow (several pending transactions).
	between bool
	// several: StepMetadataCreated counts only for a checkpoint that lists
	// several pending transactions (the create before it failed), so a
	// takeover after the crash has several to commit.
	several bool
}

func (c e2eCrashPoint) String() string {
	s := fmt.Sprintf("%s+%d", c.step, c.skip)
	if c.between {
		s += "(between)"
	}
	if c.several {
		s += "(several)"
	}
	return s
}

// e2eCrashPlan is a Hook that crashes each task along its own script of crash
// points, and optionally fails the metadata create of some checkpoints (a
// storage fault: the checkpoint fails and its transaction stays pending, so
// pending transactions accumulate). Every scripted crash is bound to fire:
// steps of a checkpoint recur with every barrier, records recur because the
// input keeps flowing until the plan is through (e2eFeed), and takeover steps
// are scripted right after a crash, which always causes a takeover.
type e2eCrashPlan struct {
	job string

	mu      sync.Mutex
	rng     *rand.Rand
	scripts map[int32][]e2eCrashPoint
	left    int
	done    chan struct{}
	off     bool
	fired   map[coordinator.Step]int
	history []string

	created map[int32]int64 // id of the last metadata created, per task

	// Storage faults: each checkpoint's create fails with probability
	// failRate, at most maxFailRun times in a row per task.
	failRate   float64
	maxFailRun int
	failRun    map[int32]int   // injected create failures in a row
	lastRun    map[int32]int   // failures right before the checkpoint being completed
	failNames  map[string]bool // creates to fail once
	failed     int

	// midRecovery counts crashes in a recovery commit with more of the
	// claim's transactions still to commit.
	midRecovery int
}

func newE2ECrashPlan(seed uint64, scripts map[int32][]e2eCrashPoint) *e2eCrashPlan {
	p := &e2eCrashPlan{
		job: e2eJob, rng: rand.New(rand.NewPCG(seed, 0x5eed)), scripts: scripts, done: make(chan struct{}),
		fired: map[coordinator.Step]int{}, created: map[int32]int64{}, failRun: map[int32]int{}, lastRun: map[int32]int{}, failNames: map[string]bool{},
	}
	for _, s := range scripts {
		p.left += len(s)
	}
	if p.left == 0 {
		close(p.done)
	}
	return p
}

var errE2EStorage = errors.New("injected storage fault: metadata create failed")

// hook implements coordinator.Hook.
func (p *e2eCrashPlan) hook(task int32, s coordinator.Step, id int64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch s {
	case coordinator.StepMetadataCreated:
		p.created[task] = id
	case coordinator.StepClaimed:
		p.failRun[task], p.lastRun[task] = 0, 0 // the new incarnation starts with nothing pending
	}
	if p.crashLocked(task, s, id) {
		return coordinator.ErrCrash
	}
	// The checkpoint goes on to its metadata create: maybe make it fail.
	if s == coordinator.StepUploaded && !p.off && p.failRate > 0 {
		if p.failRun[task] < p.maxFailRun && p.rng.Float64() < p.failRate {
			p.failRun[task]++
			p.failNames[coordinator.MetadataName(p.job, task, id)] = true
		} else {
			p.lastRun[task], p.failRun[task] = p.failRun[task], 0
		}
	}
	return nil
}

func (p *e2eCrashPlan) crashLocked(task int32, s coordinator.Step, id int64) bool {
	script := p.scripts[task]
	if p.off || len(script) == 0 || script[0].step != s {
		return false
	}
	cp := &script[0]
	if cp.between && id >= p.created[task] {
		return false // the completing checkpoint's own commit: none follows
	}
	if cp.several && p.lastRun[task] == 0 {
		return false // the checkpoint lists only its own transaction
	}
	if cp.skip > 0 {
		cp.skip--
		return false
	}
	p.scripts[task] = script[1:]
	p.fired[s]++
	if s == coordinator.StepRecoveryCommit && id < p.created[task] {
		p.midRecovery++
	}
	p.history = append(p.history, fmt.Sprintf("task %d at %s of checkpoint %d", task, s, id))
	if p.left--; p.left == 0 {
		close(p.done)
	}
	return true
}

// storageFault is the FaultyStorage fault: it fails the creates hook chose.
func (p *e2eCrashPlan) storageFault(op coordinator.Op, name string) error {
	if op != coordinator.OpCreate {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.failNames[name] {
		delete(p.failNames, name) // once: a later claim may take the same id
		p.failed++
		return errE2EStorage
	}
	return nil
}

// running reports whether scripted crashes are left.
func (p *e2eCrashPlan) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// stop turns every fault off.
func (p *e2eCrashPlan) stop() {
	p.mu.Lock()
	p.off = true
	p.mu.Unlock()
}

func (p *e2eCrashPlan) summary() (crashes int, fired map[coordinator.Step]int, storageFaults int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, c := range p.fired {
		n += c
	}
	return n, maps.Clone(p.fired), p.failed
}

func (p *e2eCrashPlan) pendingScripts() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var b strings.Builder
	tasks := make([]int32, 0, len(p.scripts))
	for task := range p.scripts {
		tasks = append(tasks, task)
	}
	slices.Sort(tasks)
	for _, task := range tasks {
		if len(p.scripts[task]) > 0 {
			fmt.Fprintf(&b, " task %d: %v;", task, p.scripts[task])
		}
	}
	return b.String()
}

// e2eRunPlan runs the count job over a live input stream under plan with the
// given settings, until every scripted crash fired and every input's output
// is committed; it stops the job gracefully and returns the input's true
// counts and the records produced per partition. Every check is the
// caller's.
func e2eRunPlan(t *testing.T, e *e2eEnv, plan *e2eCrashPlan, mod func(*service.Config), minPerPart int) (map[string]int64, int64) {
	t.Helper()
	c := e.config()
	c.Hook = plan.hook
	fs := coordinator.NewFaultyStorage(e2eLocalStorage(t, e.ckptDir))
	fs.SetFault(plan.storageFault)
	c.Storage = fs
	if mod != nil {
		mod(&c)
	}
	j := e2eStart(t, c, e2eLogger(t))
	stream := kafkatest.NewStream(t, e.addr, e2eInput, e.parts)
	e2eFeed(t, stream, 10, minPerPart, 20*minPerPart, 20*time.Millisecond, plan.running)
	select {
	case <-plan.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("scripted crashes left after %d records per partition:%s", stream.Total()/int(e.parts), plan.pendingScripts())
	}
	plan.stop()
	e2eWaitOutput(t, e, stream, 30*time.Second)
	if err := j.stop(); err != nil {
		t.Fatalf("job: %v", err)
	}
	return stream.Want(), int64(stream.Total()) / int64(e.parts)
}

// e2eLogPlan reports what the plan injected.
func e2eLogPlan(t *testing.T, plan *e2eCrashPlan) {
	crashes, fired, faults := plan.summary()
	steps := make([]string, 0, len(fired))
	for s, n := range fired {
		steps = append(steps, fmt.Sprintf("%s=%d", s, n))
	}
	sort.Strings(steps)
	t.Logf("%d crashes injected (%s), %d checkpoint metadata creates failed", crashes, strings.Join(steps, " "), faults)
}
