// Package integration proves Sluice's exactly-once guarantees on real
// processes and real networks: the example count job (cmd/processor) runs
// in containers next to a broker container (cmd/broker, i.e. kfake on a
// data volume, or a real Kafka image with SLUICE_KAFKA_IMAGE) and, for one
// scenario, an S3 container, all started with integration/sluicetest.
// Processors are killed, restarted, scaled, cut off the network; the broker
// is killed; the S3 store is frozen. Every scenario ends with an
// independent read_committed verifier (a Go consumer, and kcat in some)
// that finds every input's count exactly once, in order per key.
//
// `go test -short` skips these tests; so does a machine without Docker
// (except in CI, where they fail instead). SLUICETEST_LOGS=1 prints every
// container's whole log at the end of every test; by default only failed
// tests print the tails.
package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/sluice-stream/sluice/integration/sluicetest"
	"github.com/sluice-stream/sluice/internal/kafkatest"
)

const (
	processorPkg = "github.com/sluice-stream/sluice/cmd/processor"
	jobName      = "counts"
	inputTopic   = "events"
	outputTopic  = "counts"
	// tasks is divisible by 1, 2 and 3: every instance gets an even share.
	tasks = 6
	// session is the processors' group session timeout: long enough that
	// a processor starved of CPU (CI runs other test packages beside this
	// one on 2 cores) is not expelled by mistake.
	session = 6 * time.Second
	// shortSession is the session of the scenarios that kill or cut off
	// processors: the group notices a dead member sooner.
	shortSession = 3 * time.Second
)

func TestMain(m *testing.M) {
	// The Ryuk reaper image cannot be pulled everywhere; sluicetest
	// removes what it started itself.
	if os.Getenv("TESTCONTAINERS_RYUK_DISABLED") == "" {
		os.Setenv("TESTCONTAINERS_RYUK_DISABLED", "true")
	}
	os.Exit(m.Run())
}

// scenario is one test's env, job image, input stream and output watcher.
type scenario struct {
	t      *testing.T
	env    *sluicetest.Env
	img    sluicetest.Image
	stream *kafkatest.Stream
	out    *sluicetest.Tail
	load   *load
}

// newScenario starts the env, builds (or reuses) the processor image and
// creates the topics.
func newScenario(t *testing.T, opts sluicetest.Options) *scenario {
	t.Helper()
	began := time.Now()
	env := sluicetest.Start(t, opts)
	img := sluicetest.BuildImage(t, processorPkg)
	env.CreateTopics(t, tasks, inputTopic, outputTopic)
	s := &scenario{
		t: t, env: env, img: img,
		stream: kafkatest.NewStream(t, env.Broker.Addr, inputTopic, tasks),
		out:    env.Tail(t, outputTopic),
	}
	t.Logf("env up in %s: broker %s (%s), checkpoints %s", time.Since(began).Round(time.Millisecond), env.Broker.Addr, env.Broker.Image, env.CheckpointDir)
	return s
}

// jobArgs is the command line of the count job with test timings: fast
// checkpoints, a short session (an expelled member is noticed quickly),
// then extra.
func jobArgs(extra ...string) []string {
	return append([]string{
		"run", "--job", jobName, "--input", inputTopic, "--output", outputTopic,
		"--interval", "200ms",
		"--session-timeout", session.String(),
		"--rebalance-timeout", "20s",
		"--checkpoint-timeout", "20s",
		"--stop-timeout", "20s",
		"--txn-timeout", "2m",
		"--retained", "2",
	}, extra...)
}

// shortGroupArgs are the group timings of the scenarios that kill or cut
// off processors: a short session, so the group notices a dead member
// soon, and a short rebalance timeout, which bounds how long kfake's group
// waits in a rebalance for a member that joined and then died (it waits
// for the whole rebalance timeout there, not for the session timeout).
func shortGroupArgs() []string {
	return []string{"--session-timeout", shortSession.String(), "--rebalance-timeout", "6s"}
}

// start starts n processors of the job.
func (s *scenario) start(n int, extra ...string) []*sluicetest.Processor {
	s.t.Helper()
	return s.env.StartProcessors(s.t, s.img, n, jobArgs(extra...)...)
}

// load writes keyed input to every partition, batch records per partition
// every tick, until stopped. Pause holds it between two batches, so no
// write is in flight (e.g. while the broker is killed).
type load struct {
	gate  sync.Mutex
	stopc chan struct{}
	done  chan error
}

// startLoad starts the input.
func (s *scenario) startLoad(batch int, tick time.Duration) {
	l := &load{stopc: make(chan struct{}), done: make(chan error, 1)}
	s.load = l
	go func() {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		tk := time.NewTicker(tick)
		defer tk.Stop()
		for {
			l.gate.Lock()
			pctx, pcancel := context.WithTimeout(ctx, time.Minute)
			err := s.stream.Produce(pctx, batch)
			pcancel()
			l.gate.Unlock()
			if err != nil {
				l.done <- fmt.Errorf("produce input: %w", err)
				return
			}
			select {
			case <-l.stopc:
				l.done <- nil
				return
			case <-tk.C:
			}
		}
	}()
	s.t.Cleanup(func() { _ = l.stop() })
}

// pause waits for the batch in flight and holds the input.
func (l *load) pause() { l.gate.Lock() }

// resume lets the input go on after pause.
func (l *load) resume() { l.gate.Unlock() }

// stop ends the input; from then on the stream's Total and Want are final.
func (l *load) stop() error {
	select {
	case <-l.stopc:
		return nil
	default:
	}
	close(l.stopc)
	return <-l.done
}

// stopLoad ends the input and fails the test if producing failed.
func (s *scenario) stopLoad() {
	s.t.Helper()
	if err := s.load.stop(); err != nil {
		s.t.Fatal(err)
	}
	s.t.Logf("input stopped: %d records", s.stream.Total())
}

// waitFor polls cond every 200 ms until it holds; past d the test fails
// with what it waited for and what describe says about the state.
func (s *scenario) waitFor(d time.Duration, what string, cond func() bool, describe func() string) {
	s.t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			state := ""
			if describe != nil {
				state = ": " + describe()
			}
			s.t.Fatalf("timed out after %s waiting for %s%s", d, what, state)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// scrape returns the processor's metrics, or nil if it does not answer.
func scrape(p *sluicetest.Processor) sluicetest.Metrics {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m, err := p.Scrape(ctx)
	if err != nil {
		return nil
	}
	return m
}

// owned is how many tasks p runs now (-1 if it does not answer).
func owned(p *sluicetest.Processor) int {
	m := scrape(p)
	if m == nil {
		return -1
	}
	return int(m.Sum("sluice_tasks_owned"))
}

// assignment describes who runs how many tasks, for failure messages.
func assignment(ps ...*sluicetest.Processor) string {
	var b strings.Builder
	for _, p := range ps {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		fmt.Fprintf(&b, "%s=%d tasks (ready %v) ", p.Name, owned(p), p.Ready(ctx))
		cancel()
	}
	return strings.TrimSpace(b.String())
}

// waitBalanced waits until ps together run every task, each its even
// share, all ready.
func (s *scenario) waitBalanced(ps ...*sluicetest.Processor) {
	s.t.Helper()
	lo, hi := tasks/len(ps), (tasks+len(ps)-1)/len(ps)
	s.waitFor(90*time.Second, fmt.Sprintf("%d tasks spread evenly over %d processors, all ready", tasks, len(ps)), func() bool {
		sum := 0
		for _, p := range ps {
			n := owned(p)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			ready := p.Ready(ctx)
			cancel()
			if n < lo || n > hi || !ready {
				return false
			}
			sum += n
		}
		return sum == tasks
	}, func() string { return assignment(ps...) })
}

// recordsIn is the input records p processed so far (over its tasks, in
// this run of its process), or -1 if it does not answer.
func recordsIn(p *sluicetest.Processor) float64 {
	m := scrape(p)
	if m == nil {
		return -1
	}
	return m.Sum("sluice_records_in_total")
}

// waitProgress waits until p processed n more records than now.
func (s *scenario) waitProgress(p *sluicetest.Processor, n float64) {
	s.t.Helper()
	from := recordsIn(p)
	s.waitFor(90*time.Second, fmt.Sprintf("%s processing %v more records", p.Name, n), func() bool {
		return recordsIn(p) >= from+n
	}, func() string { return fmt.Sprintf("records in %v, was %v", recordsIn(p), from) })
}

// waitAllOutput waits until a read_committed reader sees one output
// record per input record so far (the count job writes one per input).
func (s *scenario) waitAllOutput(d time.Duration) {
	s.t.Helper()
	s.out.WaitLen(s.t, s.stream.Total(), d)
}

// stopGracefully stops p with SIGTERM and requires exit status 0.
func stopGracefully(t *testing.T, p *sluicetest.Processor) {
	t.Helper()
	if code := p.Stop(t, time.Minute); code != 0 {
		t.Fatalf("%s exited with status %d after SIGTERM, want 0", p.Name, code)
	}
}

// checkExactlyOnce is the Go verdict: a separate read_committed reader
// reads the output to its end (after every transaction was decided), and
// every key's counts must be exactly 1..n in order, n its true count:
// nothing lost, nothing doubled, and the keyed state moved with its task.
func (s *scenario) checkExactlyOnce() []*kgo.Record {
	s.t.Helper()
	out := s.env.ReadCommitted(s.t, outputTopic, 2*time.Minute)
	want := s.stream.Want()
	kafkatest.CheckExactlyOnceInOrder(s.t, out, want)
	if !s.t.Failed() {
		kafkatest.CheckCounts(s.t, out, want)
	}
	s.t.Logf("exactly once (Go read_committed reader): %d inputs, %d outputs, %d keys", s.stream.Total(), len(out), len(want))
	return out
}

// checkExactlyOnceKcat is the verdict of a reader that shares no code with
// Sluice or franz-go: kcat (librdkafka) with isolation.level=read_committed
// on the host. kcat is required in CI (CI=true); elsewhere a missing kcat
// only skips this second opinion.
func (s *scenario) checkExactlyOnceKcat() {
	s.t.Helper()
	kcat, ok := kafkatest.Kcat(s.t)
	if !ok {
		s.t.Log("kcat is not installed (apt-get install -y kcat): kcat verdict skipped outside CI")
		return
	}
	committed := kafkatest.KcatRead(s.t, kcat, s.env.Broker.Addr, outputTopic, "read_committed", 2*time.Minute)
	uncommitted := kafkatest.KcatRead(s.t, kcat, s.env.Broker.Addr, outputTopic, "read_uncommitted", 2*time.Minute)
	want := s.stream.Want()
	kafkatest.CheckExactlyOnceInOrder(s.t, committed, want)
	if !s.t.Failed() {
		kafkatest.CheckCounts(s.t, committed, want)
	}
	s.t.Logf("exactly once (kcat read_committed): %d inputs, %d outputs read_committed, %d read_uncommitted (aborted output hidden from read_committed: %d)",
		s.stream.Total(), len(committed), len(uncommitted), len(uncommitted)-len(committed))
}

// logLine is one JSON log line of a processor.
type logLine struct {
	Msg   string `json:"msg"`
	Level string `json:"level"`
	Err   string `json:"err"`
	Task  *int32 `json:"task"`
	// RecordsIn is set on the "job stopped" line: the records the process
	// read over its life.
	RecordsIn *float64 `json:"records_in"`
	raw       string
}

// logLines parses the processor's JSON log lines (other lines are
// skipped).
func logLines(s string) []logLine {
	var out []logLine
	for _, line := range strings.Split(s, "\n") {
		i := strings.IndexByte(line, '{')
		if i < 0 {
			continue
		}
		var l logLine
		if json.Unmarshal([]byte(line[i:]), &l) == nil && l.Msg != "" {
			l.raw = line[i:]
			out = append(out, l)
		}
	}
	return out
}

// countLines counts the log lines whose message or error contains sub.
func countLines(lines []logLine, sub string) int {
	n := 0
	for _, l := range lines {
		if strings.Contains(l.Msg, sub) || strings.Contains(l.Err, sub) {
			n++
		}
	}
	return n
}

// sumRecordsIn sums the final records-in counts.
func sumRecordsIn(finals map[string]float64) int64 {
	var sum float64
	for _, v := range finals {
		sum += v
	}
	return int64(math.Round(sum))
}
