package bench

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"math/bits"
	"os"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/sluice-stream/sluice/coordinator"
	"github.com/sluice-stream/sluice/operators"
	"github.com/sluice-stream/sluice/service"
)

// Flags of the benchmarks; pass them after -args.
var (
	flagRecords = flag.Int("records", 4_000_000, "records pre-produced for each run of BenchmarkPassthrough")
	flagMode    = flag.String("mode", "both", "what BenchmarkPassthrough runs: both (and their ratio), raw or sluice (for profiles)")
	flagState   = flag.String("state", "pebble", "state backend of the Sluice job: pebble (the default of service.Config) or memory")
	flagVerify  = flag.Bool("verify", true, "after each run, read the output with read_committed and check every input record is there exactly once (not timed)")
	flagCommit  = flag.Bool("commitoffsets", true, "the Sluice job commits checkpointed offsets to its consumer group (service.Config's default)")
	flagPairs   = flag.Int("pairs", 3, "raw/Sluice pairs per interval and b.N iteration; medians are reported")
	flagProfile = flag.String("copyprofile", "", "write a CPU profile of each copy alone (not the pre-production) to `prefix`-<raw|sluice>-<interval>.prof")
)

const (
	partitions = 8
	inTopic    = "in"
	outTopic   = "out"
	// keyLen+valueLen is the 100-byte record of the benchmark. Keys are
	// distinct, so the output of a passthrough lands on the partition of
	// its input (same murmur2 key partitioning on both sides).
	keyLen    = 16
	valueLen  = 84
	recordLen = keyLen + valueLen
)

// run is what one copy of the input (raw or Sluice) measured.
type run struct {
	// copy is from the first record consumed until every output record is
	// committed: the benchmark's rate.
	copy time.Duration
	// startup is from the start (no client created yet) until the first
	// record was consumed: group join or task takeover.
	startup time.Duration
	// tail is from the last record handed to a producer until every output
	// record is committed: the wait for the interval's end and the commit.
	tail time.Duration
	// cpu is the process's CPU time (user+system, broker included) during
	// startup and copy.
	cpu time.Duration
	// conns are the established client connections to the broker, sampled
	// while records flow.
	conns int
	// others is the CPU other processes of the machine used during the
	// copy, in cores: the benchmark shares the machine.
	others float64
}

func (r run) rate(n int) float64 { return float64(n) / r.copy.Seconds() }
func (r run) e2eRate(n int) float64 {
	return float64(n) / (r.startup + r.copy).Seconds()
}

// BenchmarkPassthrough copies N pre-produced 100-byte records from an
// 8-partition topic to another, exactly once, at checkpoint (transaction)
// intervals of 100 ms and 1 s, with a raw franz-go GroupTransactSession loop
// and with a Sluice map-only job, each run on a fresh in-process kfake
// broker. Runs come in pairs (raw and Sluice back to back, alternating which
// goes first) so that both see the same machine; it reports the medians of
// records/s and MB/s, measured until every output record is committed, and
// the median of the pairs' ratios Sluice/raw ("ratio"). On a shared machine
// "cpu-ratio", the ratio of records per CPU second of the process, is the
// steadier figure; "others-cores" says how much CPU other processes took.
func BenchmarkPassthrough(b *testing.B) {
	for _, interval := range []time.Duration{100 * time.Millisecond, time.Second} {
		b.Run("interval="+interval.String(), func(b *testing.B) {
			n := *flagRecords
			var raw, slu []run
			var ratios, e2eRatios, cpuRatios []float64
			for range b.N {
				for i := range *flagPairs {
					var r, s run
					switch {
					case *flagMode == "raw":
						r = measure(b, "raw", n, interval, copyRaw)
					case *flagMode == "sluice":
						s = measure(b, "sluice", n, interval, copySluice)
					case i%2 == 0:
						r = measure(b, "raw", n, interval, copyRaw)
						s = measure(b, "sluice", n, interval, copySluice)
					default:
						s = measure(b, "sluice", n, interval, copySluice)
						r = measure(b, "raw", n, interval, copyRaw)
					}
					if r.copy > 0 {
						raw = append(raw, r)
					}
					if s.copy > 0 {
						slu = append(slu, s)
					}
					line := fmt.Sprintf("pair %d:", i+1)
					if r.copy > 0 {
						line += " raw " + r.describe(n)
					}
					if s.copy > 0 {
						line += " | sluice " + s.describe(n)
					}
					if r.copy > 0 && s.copy > 0 {
						ratios = append(ratios, s.rate(n)/r.rate(n))
						e2eRatios = append(e2eRatios, s.e2eRate(n)/r.e2eRate(n))
						cpuRatios = append(cpuRatios, r.cpuPerRecord(n)/s.cpuPerRecord(n))
						line += fmt.Sprintf(" | ratio %.2f, cpu-ratio %.2f", s.rate(n)/r.rate(n), r.cpuPerRecord(n)/s.cpuPerRecord(n))
					}
					b.Log(line) // one line per pair: the testing package keeps only 10
				}
			}
			b.StopTimer()
			report(b, "raw", n, raw)
			report(b, "sluice", n, slu)
			if len(ratios) > 0 {
				b.ReportMetric(median(ratios), "ratio")
				b.ReportMetric(median(e2eRatios), "e2e-ratio")
				b.ReportMetric(median(cpuRatios), "cpu-ratio")
			}
		})
	}
}

// copier copies n records of inTopic to outTopic on the broker at addr and
// fills in what it measured; the copy ends when all n are committed.
type copier func(b *testing.B, addr string, n int, interval time.Duration, r *run)

// measure runs one copy on a fresh broker: only the copy is timed.
func measure(b *testing.B, name string, n int, interval time.Duration, copyFn copier) run {
	b.StopTimer()
	cluster, addr := newCluster(b, partitions)
	defer cluster.Close()
	produceInput(b, addr, n)
	var r run
	if *flagProfile != "" {
		f, err := os.Create(fmt.Sprintf("%s-%s-%s.prof", *flagProfile, name, interval))
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			b.Fatal(err)
		}
	}
	cpu0, busy0, t0 := cpuTime(), machineBusy(), time.Now()
	b.StartTimer()
	copyFn(b, addr, n, interval, &r)
	b.StopTimer()
	r.cpu = cpuTime() - cpu0
	r.others = max(0, (machineBusy()-busy0-r.cpu).Seconds()/time.Since(t0).Seconds())
	if *flagProfile != "" {
		pprof.StopCPUProfile()
	}
	if *flagVerify {
		verifyOutput(b, addr, n)
	}
	return r
}

// describe is one run in a log line.
func (r run) describe(n int) string {
	return fmt.Sprintf("%.0f rec/s, %.2f µs CPU/rec (startup %.2fs, copy %.2fs, tail %.2fs, %d conns, other processes %.1f cores)",
		r.rate(n), r.cpuPerRecord(n), r.startup.Seconds(), r.copy.Seconds(), r.tail.Seconds(), r.conns, r.others)
}

func (r run) cpuPerRecord(n int) float64 { return float64(r.cpu.Nanoseconds()) / 1e3 / float64(n) }

// report reports the medians of runs.
func report(b *testing.B, name string, n int, runs []run) {
	if len(runs) == 0 {
		return
	}
	med := func(f func(run) float64) float64 {
		vs := make([]float64, len(runs))
		for i, r := range runs {
			vs[i] = f(r)
		}
		return median(vs)
	}
	rate := med(func(r run) float64 { return r.rate(n) })
	b.ReportMetric(rate, name+"-rec/s")
	b.ReportMetric(rate*recordLen/1e6, name+"-MB/s")
	b.ReportMetric(med(func(r run) float64 { return r.e2eRate(n) }), name+"-e2e-rec/s")
	b.ReportMetric(med(func(r run) float64 { return r.startup.Seconds() }), name+"-startup-s")
	b.ReportMetric(med(func(r run) float64 { return r.tail.Seconds() }), name+"-tail-s")
	b.ReportMetric(med(func(r run) float64 { return r.cpuPerRecord(n) }), name+"-cpu-µs/rec")
	b.ReportMetric(med(func(r run) float64 { return float64(r.conns) }), name+"-conns")
	b.ReportMetric(med(func(r run) float64 { return r.others }), name+"-others-cores")
}

func median(vs []float64) float64 {
	vs = slices.Clone(vs)
	slices.Sort(vs)
	if len(vs)%2 == 1 {
		return vs[len(vs)/2]
	}
	return (vs[len(vs)/2-1] + vs[len(vs)/2]) / 2
}

// copyRaw is the baseline: one GroupTransactSession (one transactional
// producer, consumer group, offsets committed in the transaction) that
// ends its transaction once per interval, the way the franz-go examples
// copy exactly once. A transaction ends at the first poll after its interval
// has passed; the last one at its interval's end, like a Sluice barrier on
// the next tick.
func copyRaw(b *testing.B, addr string, n int, interval time.Duration, r *run) {
	ctx := context.Background()
	start := time.Now()
	sess, err := kgo.NewGroupTransactSession(
		kgo.SeedBrokers(addr),
		kgo.TransactionalID("raw-copy"),
		kgo.TransactionTimeout(time.Minute),
		kgo.ConsumerGroup("raw-copy"),
		kgo.ConsumeTopics(inTopic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.RequireStableFetchOffsets(),
	)
	if err != nil {
		b.Fatal(err)
	}
	defer sess.Close()
	var (
		committed, inTxn int
		open             bool
		txnStart, first  time.Time
		last             time.Time
	)
	end := func() {
		ok, err := sess.End(ctx, kgo.TryCommit)
		if err != nil {
			b.Fatalf("raw copy: end transaction: %v", err)
		}
		if ok {
			committed += inTxn
		}
		// Not committed (a rebalance): the session rewinds and the records
		// come again.
		inTxn, open = 0, false
	}
	for committed < n {
		if committed+inTxn == n {
			time.Sleep(time.Until(txnStart.Add(interval)))
			end()
			continue
		}
		fs := sess.PollFetches(ctx)
		if err := fs.Err0(); err != nil {
			b.Fatalf("raw copy: poll: %v", err)
		}
		if !open {
			if err := sess.Begin(); err != nil {
				b.Fatalf("raw copy: begin: %v", err)
			}
			open, txnStart = true, time.Now()
		}
		if !fs.Empty() && first.IsZero() {
			first = time.Now()
		}
		fs.EachRecord(func(rec *kgo.Record) {
			sess.Produce(ctx, &kgo.Record{Topic: outTopic, Key: rec.Key, Value: rec.Value}, nil)
			inTxn++
		})
		if committed+inTxn == n && last.IsZero() {
			last = time.Now()
		}
		if !fs.Empty() && r.conns == 0 && time.Since(first) > 500*time.Millisecond {
			r.conns = connections(addr)
		}
		if committed+inTxn < n && time.Since(txnStart) >= interval {
			end()
		}
	}
	r.copy = time.Since(first)
	r.startup = first.Sub(start)
	r.tail = time.Since(last)
}

// passthroughJob is the map-only job: raw records in, the same key and value
// out.
func passthroughJob() *operators.Job {
	job := operators.NewJob("passthrough")
	in := operators.FromKafka(job, inTopic, operators.Raw)
	same := operators.Map(in, func(r *kgo.Record) *kgo.Record { return r })
	operators.ToKafka(same, outTopic, func(r *kgo.Record) ([]byte, []byte, error) { return r.Key, r.Value, nil })
	return job
}

// sluiceConfig is service.DefaultConfig for the broker at addr, with its
// folders in the benchmark's temporary directory.
func sluiceConfig(b *testing.B, addr string, interval time.Duration) service.Config {
	c := service.DefaultConfig()
	c.Brokers = []string{addr}
	c.CheckpointDir = b.TempDir()
	c.WorkDir = b.TempDir()
	c.InstanceID = "bench"
	c.StateBackend = *flagState
	c.Settings.Interval = interval
	c.Settings.CommitOffsets = *flagCommit
	return c
}

// copySluice runs the passthrough job with service.Start and Process.Run.
// It is done when every task has completed (and so committed) a checkpoint
// whose offsets reach the end of its input partition.
func copySluice(b *testing.B, addr string, n int, interval time.Duration, r *run) {
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	ends := endOffsets(b, addr, inTopic)
	job := passthroughJob()
	start := time.Now()
	p, err := service.Start(ctx, job, sluiceConfig(b, addr, interval), slog.New(slog.DiscardHandler))
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()

	checked := map[int32]int64{}
	finished := map[int32]bool{}
	var first, last time.Time
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for len(finished) < len(ends) {
		select {
		case err := <-done:
			b.Fatalf("sluice job stopped early: %v", err)
		case <-tick.C:
		}
		// Tasks appear as the consumer group assigns them.
		stats := p.Instance.Stats()
		var in int64
		for _, s := range stats {
			in += s.RecordsIn.Load()
		}
		if in > 0 && first.IsZero() {
			first = time.Now()
		}
		if in == int64(n) && last.IsZero() {
			last = time.Now()
		}
		if !first.IsZero() && r.conns == 0 && time.Since(first) > 500*time.Millisecond {
			r.conns = connections(addr)
		}
		for task, s := range stats {
			id := s.LastCheckpointID.Load()
			if finished[task] || id == 0 || id == checked[task] {
				continue
			}
			c, err := coordinator.LoadCheckpoint(ctx, p.Storage, job.Name(), task, id)
			if err != nil {
				continue // deleted by retention meanwhile: a newer one exists
			}
			checked[task] = id
			if c.Offsets[inTopic] >= ends[task] {
				finished[task] = true
			}
		}
	}
	r.copy = time.Since(first)
	r.startup = first.Sub(start)
	r.tail = time.Since(last)
	stop()
	if err := <-done; err != nil {
		b.Fatalf("sluice job: %v", err)
	}
}

// newCluster starts a one-broker kfake cluster with the input and output
// topics.
func newCluster(b *testing.B, parts int32) (*kfake.Cluster, string) {
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(parts, inTopic, outTopic))
	if err != nil {
		b.Fatal(err)
	}
	return c, c.ListenAddrs()[0]
}

// produceInput writes n records with distinct 16-byte keys and 84-byte
// values to inTopic, partitioned by key.
func produceInput(b *testing.B, addr string, n int) {
	cl, err := kgo.NewClient(kgo.SeedBrokers(addr), kgo.DefaultProduceTopic(inTopic), kgo.DisableClientMetrics())
	if err != nil {
		b.Fatal(err)
	}
	defer cl.Close()
	ctx := context.Background()
	value := make([]byte, valueLen)
	for i := range value {
		value[i] = 'a' + byte(i%26)
	}
	var failed atomic.Pointer[error]
	promise := func(_ *kgo.Record, err error) {
		if err != nil {
			failed.CompareAndSwap(nil, &err)
		}
	}
	for i := range n {
		cl.Produce(ctx, &kgo.Record{Key: recordKey(i), Value: value}, promise)
	}
	if err := cl.Flush(ctx); err != nil {
		b.Fatal(err)
	}
	if err := failed.Load(); err != nil {
		b.Fatalf("produce input: %v", *err)
	}
}

// recordKey is the 16-byte key of input record i.
func recordKey(i int) []byte { return fmt.Appendf(make([]byte, 0, keyLen), "key-%012d", i) }

// endOffsets returns the end offset of every partition of topic.
func endOffsets(b *testing.B, addr, topic string) map[int32]int64 {
	cl, err := kgo.NewClient(kgo.SeedBrokers(addr))
	if err != nil {
		b.Fatal(err)
	}
	defer cl.Close()
	listed, err := kadm.NewClient(cl).ListEndOffsets(context.Background(), topic)
	if err == nil {
		err = listed.Error()
	}
	if err != nil {
		b.Fatal(err)
	}
	out := map[int32]int64{}
	listed.Each(func(o kadm.ListedOffset) { out[o.Partition] = o.Offset })
	return out
}

// verifyOutput reads outTopic with read_committed to its end and checks that
// every input key is there exactly once. The end is found as in kafkatest:
// a sentinel appended to each partition after the copy.
func verifyOutput(b *testing.B, addr string, n int) {
	const sentinel = "sentinel"
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	prod, err := kgo.NewClient(kgo.SeedBrokers(addr), kgo.DefaultProduceTopic(outTopic), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		b.Fatal(err)
	}
	defer prod.Close()
	for p := range int32(partitions) {
		if err := prod.ProduceSync(ctx, &kgo.Record{Partition: p, Key: []byte(sentinel)}).FirstErr(); err != nil {
			b.Fatal(err)
		}
	}
	cons, err := kgo.NewClient(kgo.SeedBrokers(addr), kgo.ConsumeTopics(outTopic),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		b.Fatal(err)
	}
	defer cons.Close()
	seen := make([]uint64, (n+63)/64)
	var count, dups, bad int
	ended := map[int32]bool{}
	for len(ended) < partitions {
		fs := cons.PollFetches(ctx)
		if ctx.Err() != nil {
			b.Fatalf("verify: reached the end of %d of %d partitions", len(ended), partitions)
		}
		fs.EachRecord(func(r *kgo.Record) {
			if string(r.Key) == sentinel {
				ended[r.Partition] = true
				return
			}
			i, err := strconv.Atoi(string(r.Key[4:]))
			if err != nil || i < 0 || i >= n || len(r.Value) != valueLen {
				bad++
				return
			}
			if seen[i/64]&(1<<(i%64)) != 0 {
				dups++
			}
			seen[i/64] |= 1 << (i % 64)
			count++
		})
	}
	distinct := 0
	for _, w := range seen {
		distinct += bits.OnesCount64(w)
	}
	if distinct != n || dups != 0 || bad != 0 {
		b.Fatalf("verify: %d of %d input records in the output, %d duplicates, %d malformed (%d records read)", distinct, n, dups, bad, count)
	}
}

// machineBusy is the CPU time all processes of the machine have used (from
// /proc/stat, in USER_HZ ticks of 10 ms); zero where it cannot be read.
func machineBusy() time.Duration {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(data), "\n")
	fields := strings.Fields(line) // cpu user nice system idle iowait irq softirq steal ...
	var busy int64
	for i, f := range fields {
		if i == 0 || i == 4 || i == 5 || i > 8 {
			continue
		}
		v, _ := strconv.ParseInt(f, 10, 64)
		busy += v
	}
	return time.Duration(busy) * 10 * time.Millisecond
}

// cpuTime is the process's user plus system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
