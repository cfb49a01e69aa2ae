package service_test

// Consumer-group tests: several instances of the count job, each its own
// service.Process with its own Kafka clients, local state folder and
// checkpoint storage client, in one test process against one in-process
// kfake; only the checkpoint folder (like an S3 bucket) and the broker are
// shared. Kafka's group protocol spreads the tasks over them. Every
// exactly-once verdict comes from a separate read_committed reader
// (kafkatest.ReadCommitted + kafkatest.CheckCounts); CheckCounts checks that
// the last count of every key equals its true count, which proves that the
// keyed state moved with its task whenever the task moved.
//
// Helpers here are this file's own (prefix grp) so these tests do not depend
// on the e2e files' internals. SLUICE_E2E_LOG=1 streams every instance's log
// to stderr; otherwise the log's tail is printed when a test fails.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/sluice-stream/sluice/coordinator"
	"github.com/sluice-stream/sluice/internal/example"
	"github.com/sluice-stream/sluice/internal/kafkatest"
	"github.com/sluice-stream/sluice/operators"
	"github.com/sluice-stream/sluice/service"
)

const (
	grpJob    = "grp-counts"
	grpInput  = "grp-events"
	grpOutput = "grp-counts-out"
	// grpTasks is divisible by 1, 2 and 3: with that many instances every
	// instance owns the same number of tasks.
	grpTasks = 6
	// grpSession is the group session timeout of the instances: short, so
	// an expelled member is noticed quickly (kfake's minimum is lowered).
	grpSession = 1500 * time.Millisecond
)

// grpEnv is one test's broker, topics, shared checkpoint folder and log.
type grpEnv struct {
	t       *testing.T
	addr    string
	cluster *kfake.Cluster
	ckptDir string
	log     *grpLog
	stream  *kafkatest.Stream
}

func newGrpEnv(t *testing.T) *grpEnv { return newGrpEnvParts(t, grpTasks) }

// newGrpEnvParts is newGrpEnv with an input of the given partition count.
func newGrpEnvParts(t *testing.T, parts int32) *grpEnv {
	t.Helper()
	addr, cluster := kafkatest.Start(t,
		kfake.GroupMinSessionTimeout(100*time.Millisecond),
		// KIP-848 groups take their timing from the broker.
		kfake.BrokerConfigs(map[string]string{
			"group.consumer.heartbeat.interval.ms": "250",
			"group.consumer.session.timeout.ms":    "1500",
		}),
	)
	kafkatest.CreateTopics(t, addr, parts, grpInput, grpOutput)
	e := &grpEnv{t: t, addr: addr, cluster: cluster, ckptDir: t.TempDir(), log: newGrpLog(t)}
	e.stream = kafkatest.NewStream(t, addr, grpInput, parts)
	return e
}

// config is an instance's configuration: its own work folder and id, the
// shared checkpoint folder, fast checkpoints, a short session.
func (e *grpEnv) config(name, protocol string) service.Config {
	c := service.DefaultConfig()
	c.Brokers = []string{e.addr}
	c.CheckpointDir = e.ckptDir
	c.WorkDir = e.t.TempDir()
	c.InstanceID = name
	c.StateCacheBytes = 4 << 20
	c.TransactionTimeout = time.Minute
	c.ConnectTimeout = 10 * time.Second
	c.Settings.Interval = 50 * time.Millisecond
	c.Settings.Timeout = 20 * time.Second
	c.Settings.Retained = 2
	c.Settings.StopTimeout = 20 * time.Second
	c.GroupProtocol = protocol
	c.SessionTimeout = grpSession
	c.RebalanceTimeout = 20 * time.Second
	c.AdminAddr = ""
	return c
}

// grpInstance is one running service.Process.
type grpInstance struct {
	name   string
	p      *service.Process
	cancel context.CancelFunc
	done   chan error

	mu      sync.Mutex
	stopped bool
	final   map[int32]*coordinator.TaskStats // the stats once stopped
}

// start starts an instance with c; it is stopped with the test if the test
// does not stop it.
func (e *grpEnv) start(c service.Config) *grpInstance {
	e.t.Helper()
	return e.startJob(example.CountJob(grpJob, grpInput, grpOutput), c)
}

// startJob starts an instance of job (a version of the count job) with c.
func (e *grpEnv) startJob(job *operators.Job, c service.Config) *grpInstance {
	t := e.t
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	log := e.log.logger().With("instance", c.InstanceID)
	p, err := service.Start(ctx, job, c, log)
	if err != nil {
		cancel()
		t.Fatalf("start instance %s: %v", c.InstanceID, err)
	}
	in := &grpInstance{name: c.InstanceID, p: p, cancel: cancel, done: make(chan error, 1)}
	go func() { in.done <- p.Run(ctx) }()
	t.Cleanup(func() {
		if err := in.stop(); err != nil {
			t.Errorf("instance %s: %v", in.name, err)
		}
	})
	return in
}

// stop stops the instance gracefully (final checkpoints, then it leaves the
// group) and closes its clients. It returns what Run returned; a second stop
// returns nil.
func (in *grpInstance) stop() error {
	in.mu.Lock()
	if in.stopped {
		in.mu.Unlock()
		return nil
	}
	in.stopped = true
	in.mu.Unlock()
	in.cancel()
	var err error
	select {
	case err = <-in.done:
	case <-time.After(60 * time.Second):
		return fmt.Errorf("Run did not return within 60s of its cancellation")
	}
	st := in.p.Instance.Stats()
	in.p.Close()
	in.mu.Lock()
	in.final = st
	in.mu.Unlock()
	return err
}

// stats returns the instance's task counters (live, or as they were when it
// stopped).
func (in *grpInstance) stats() map[int32]*coordinator.TaskStats {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.final != nil {
		return in.final
	}
	return in.p.Instance.Stats()
}

// tasks returns the tasks the instance runs now (none once stopped).
func (in *grpInstance) tasks() []int32 {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.stopped {
		return nil
	}
	return in.p.Instance.Tasks()
}

// recordsIn sums RecordsIn over the instance's tasks (of given tasks only,
// if any are given).
func (in *grpInstance) recordsIn(only ...int32) int64 {
	var n int64
	for task, s := range in.stats() {
		if len(only) == 0 || slices.Contains(only, task) {
			n += s.RecordsIn.Load()
		}
	}
	return n
}

// grpWait polls cond until it holds; past d the test fails, naming what it
// waited for and, if describe is set, the state it saw.
func grpWait(t *testing.T, d time.Duration, what string, cond func() bool, describe ...func() string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			var seen []string
			for _, f := range describe {
				seen = append(seen, f())
			}
			t.Fatalf("timed out after %s waiting for %s %s", d, what, strings.Join(seen, " "))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// grpBalanced reports whether the instances together run every task exactly
// once, each instance running its even share (±1), every task restored and
// processing.
func grpBalanced(ins ...*grpInstance) bool {
	seen := map[int32]bool{}
	for _, in := range ins {
		ts := in.tasks()
		if n := len(ts); n < grpTasks/len(ins) || n > (grpTasks+len(ins)-1)/len(ins) {
			return false
		}
		for _, task := range ts {
			if seen[task] {
				return false
			}
			seen[task] = true
		}
		if !in.p.Instance.Ready() {
			return false
		}
	}
	return len(seen) == grpTasks
}

// grpAssignment describes who runs what, for failure messages.
func grpAssignment(ins ...*grpInstance) func() string {
	return func() string {
		var b strings.Builder
		b.WriteString("(assignment:")
		for _, in := range ins {
			fmt.Fprintf(&b, " %s=%v", in.name, in.tasks())
			if !in.stoppedNow() && !in.p.Instance.Ready() {
				b.WriteString("(not ready)")
			}
		}
		b.WriteString(")")
		return b.String()
	}
}

func (in *grpInstance) stoppedNow() bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.stopped
}

// waitBalanced waits until the instances run every task, evenly, all ready.
func (e *grpEnv) waitBalanced(ins ...*grpInstance) {
	e.t.Helper()
	names := make([]string, len(ins))
	for i, in := range ins {
		names[i] = in.name
	}
	grpWait(e.t, 60*time.Second, fmt.Sprintf("the %d tasks spread evenly over %v, all ready", grpTasks, names),
		func() bool { return grpBalanced(ins...) }, grpAssignment(ins...))
}

// waitProgress waits until the instance processed at least n more records
// (over all its tasks) than it had at the call, and every task it runs now
// processed some: the input really flows through it.
func (e *grpEnv) waitProgress(in *grpInstance, n int64) {
	e.t.Helper()
	before := map[int32]int64{}
	var total int64
	for task, s := range in.stats() {
		before[task] = s.RecordsIn.Load()
		total += before[task]
	}
	grpWait(e.t, 60*time.Second, fmt.Sprintf("instance %s processing input", in.name), func() bool {
		st := in.stats()
		for _, task := range in.tasks() {
			if s := st[task]; s == nil || s.RecordsIn.Load() <= before[task] {
				return false
			}
		}
		return in.recordsIn() >= total+n
	})
}

// grpProducer writes keyed input to every partition continuously, batch
// records per partition every tick, until stopped.
type grpProducer struct {
	stopc chan struct{}
	done  chan error
}

func (e *grpEnv) produce(batch int, tick time.Duration) *grpProducer {
	pr := &grpProducer{stopc: make(chan struct{}), done: make(chan error, 1)}
	go func() {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		tk := time.NewTicker(tick)
		defer tk.Stop()
		for {
			if err := e.stream.Produce(ctx, batch); err != nil {
				pr.done <- err
				return
			}
			select {
			case <-pr.stopc:
				pr.done <- nil
				return
			case <-tk.C:
			}
		}
	}()
	e.t.Cleanup(func() { _ = pr.stop() })
	return pr
}

// stop stops producing; from then on the stream's Want and Total are final.
func (pr *grpProducer) stop() error {
	select {
	case <-pr.stopc:
		return nil
	default:
	}
	close(pr.stopc)
	return <-pr.done
}

// waitOutput waits until a read_committed reader sees one output record per
// input record (the count job writes one per input). More is a duplicate.
func (e *grpEnv) waitOutput(d time.Duration) {
	t := e.t
	t.Helper()
	total := e.stream.Total()
	cl := kafkatest.Client(t, e.addr, kgo.ConsumeTopics(grpOutput), kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	n := 0
	for n < total {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("only %d of %d outputs visible to read_committed after %s", n, total, d)
		}
		fs.EachRecord(func(r *kgo.Record) {
			if string(r.Key) != kafkatest.SentinelKey {
				n++
			}
		})
	}
	if n > total {
		t.Fatalf("%d outputs visible to read_committed for %d inputs: duplicates", n, total)
	}
}

// checkExactlyOnce is the verdict: a separate read_committed reader reads
// the output to its end, and kafkatest.CheckCounts requires every key's
// counts to be exactly 1..n in order, n its true count: nothing lost,
// nothing doubled, and the last count of every key is its true count, which
// proves the keyed state moved with its task. CheckExactlyOnceInOrder runs
// first only to say where a violation is.
func (e *grpEnv) checkExactlyOnce() {
	t := e.t
	t.Helper()
	out := kafkatest.ReadCommitted(t, e.addr, grpOutput, grpTasks, 30*time.Second)
	want := e.stream.Want()
	kafkatest.CheckExactlyOnceInOrder(t, out, want)
	kafkatest.CheckCounts(t, out, want)
	t.Logf("exactly once: %d inputs, %d outputs, %d keys", e.stream.Total(), len(out), len(want))
}

// grpRecordsIn sums RecordsIn over every instance that ever ran.
func grpRecordsIn(ins ...*grpInstance) int64 {
	var n int64
	for _, in := range ins {
		n += in.recordsIn()
	}
	return n
}

// grpLog collects every instance's log of a test.
type grpLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
	w   io.Writer
}

func newGrpLog(t *testing.T) *grpLog {
	l := &grpLog{}
	l.w = &l.buf
	if os.Getenv("SLUICE_E2E_LOG") != "" {
		l.w = io.MultiWriter(os.Stderr, &l.buf)
	}
	t.Cleanup(func() {
		if t.Failed() && os.Getenv("SLUICE_E2E_LOG") == "" {
			s := l.String()
			if len(s) > 96<<10 {
				s = "...\n" + s[len(s)-96<<10:]
			}
			t.Logf("instances' log (tail):\n%s", s)
		}
	})
	return l
}

func (l *grpLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func (l *grpLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// mark returns the log's length now, for since.
func (l *grpLog) mark() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Len()
}

// since returns what was logged after mark.
func (l *grpLog) since(mark int) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return string(l.buf.Bytes()[mark:])
}

func (l *grpLog) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// grpProtocols are the group protocols a test runs under; -short runs only
// the classic one.
func grpProtocols() []string {
	if testing.Short() {
		return []string{"classic"}
	}
	return []string{"classic", "consumer"}
}

// TestGroupScaleOutAndIn scales the job from 1 instance to 3 and back to 1
// while a producer keeps writing keyed input. Every task moves at least
// once (to a new instance, then back): each move is a graceful handoff (the
// old owner's final checkpoint, then the new owner's takeover from it), so
// the output must be exactly once, the last count of every key its true
// count (the keyed state moved with its task), and no record processed
// twice (the sum of RecordsIn over every instance equals the input).
func TestGroupScaleOutAndIn(t *testing.T) {
	for _, protocol := range grpProtocols() {
		t.Run(protocol, func(t *testing.T) {
			e := newGrpEnv(t)
			a := e.start(e.config("A", protocol))
			e.waitBalanced(a)
			pr := e.produce(5, 20*time.Millisecond)
			e.waitProgress(a, 200)

			// 1 → 3.
			b := e.start(e.config("B", protocol))
			c := e.start(e.config("C", protocol))
			e.waitBalanced(a, b, c)
			for _, in := range []*grpInstance{a, b, c} {
				e.waitProgress(in, 50)
			}
			t.Logf("scaled out: %s", grpAssignment(a, b, c)())

			// 3 → 2 → 1, one at a time.
			if err := c.stop(); err != nil {
				t.Fatalf("stop C: %v", err)
			}
			e.waitBalanced(a, b)
			e.waitProgress(b, 50)
			if err := b.stop(); err != nil {
				t.Fatalf("stop B: %v", err)
			}
			e.waitBalanced(a)
			e.waitProgress(a, 100)
			t.Logf("scaled in: %s", grpAssignment(a)())

			if err := pr.stop(); err != nil {
				t.Fatalf("produce: %v", err)
			}
			e.waitOutput(60 * time.Second)
			if err := a.stop(); err != nil {
				t.Fatalf("stop A: %v", err)
			}
			e.checkExactlyOnce()
			total := int64(e.stream.Total())
			if got := grpRecordsIn(a, b, c); got != total {
				t.Fatalf("the instances processed %d input records for %d produced: %d processed twice (replayed by a handoff)", got, total, got-total)
			}
			for _, in := range []*grpInstance{a, b, c} {
				t.Logf("instance %s processed %d records", in.name, in.recordsIn())
			}
		})
	}
}

// TestGroupRollingRestart restarts 3 instances one at a time under load:
// stop one gracefully, start its replacement, wait until the replacement
// runs its share of the tasks and is ready, then the next. A graceful
// handoff takes the old owner's final checkpoint and commits it before the
// group releases the task, so the output is exactly once AND no input
// record is processed twice: the sum of RecordsIn over every instance that
// ever ran equals the number of input records exactly (a replay would
// exceed it).
func TestGroupRollingRestart(t *testing.T) {
	for _, protocol := range grpProtocols() {
		t.Run(protocol, func(t *testing.T) {
			e := newGrpEnv(t)
			live := []*grpInstance{
				e.start(e.config("A", protocol)),
				e.start(e.config("B", protocol)),
				e.start(e.config("C", protocol)),
			}
			all := slices.Clone(live)
			e.waitBalanced(live...)
			pr := e.produce(5, 20*time.Millisecond)
			for _, in := range live {
				e.waitProgress(in, 50)
			}
			for i := range live {
				old := live[i]
				if err := old.stop(); err != nil {
					t.Fatalf("stop %s: %v", old.name, err)
				}
				repl := e.start(e.config(old.name+"2", protocol))
				all = append(all, repl)
				live[i] = repl
				e.waitBalanced(live...)
				e.waitProgress(repl, 50)
				t.Logf("%s replaced by %s: %s", old.name, repl.name, grpAssignment(live...)())
			}
			if err := pr.stop(); err != nil {
				t.Fatalf("produce: %v", err)
			}
			e.waitOutput(60 * time.Second)
			for _, in := range live {
				if err := in.stop(); err != nil {
					t.Fatalf("stop %s: %v", in.name, err)
				}
			}
			e.checkExactlyOnce()
			total := int64(e.stream.Total())
			per := map[string]int64{}
			for _, in := range all {
				per[in.name] = in.recordsIn()
			}
			t.Logf("records processed per instance: %v", per)
			if got := grpRecordsIn(all...); got != total {
				t.Fatalf("the instances processed %d input records for %d produced: %d processed twice (replayed after a graceful handoff)", got, total, got-total)
			}
		})
	}
}

// grpSortedKeys is for stable log lines.
func grpSortedKeys[V any](m map[int32]V) []int32 { return slices.Sorted(maps.Keys(m)) }
