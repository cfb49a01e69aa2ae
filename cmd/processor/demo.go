package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/sluice-stream/sluice/coordinator"
	"github.com/sluice-stream/sluice/internal/example"
	"github.com/sluice-stream/sluice/service"
	"github.com/sluice-stream/sluice/sink"
)

// demoConfig are the demo's flags.
type demoConfig struct {
	dataDir    string
	listen     string
	rate       int
	users      int
	partitions int
	interval   time.Duration
	admin      string
}

// demo runs a whole Sluice on one machine with nothing to install: an
// embedded Kafka (kfake) persisted to the data folder, a generator of events,
// and the count job, with progress every second until Ctrl-C.
func demo(args []string, stdout, stderr io.Writer) int {
	var dc demoConfig
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&dc.dataDir, "data", "./sluice-demo", "folder for the broker's data, checkpoints, state and the log")
	fs.StringVar(&dc.listen, "listen", "127.0.0.1:9092", "address of the embedded Kafka broker")
	fs.IntVar(&dc.rate, "rate", 2000, "events generated per second")
	fs.IntVar(&dc.users, "users", 1000, "distinct user ids (record keys)")
	fs.IntVar(&dc.partitions, "partitions", 8, "partitions of the input and output topics")
	fs.DurationVar(&dc.interval, "interval", time.Second, "checkpoint interval")
	fs.StringVar(&dc.admin, "admin-addr", "127.0.0.1:8080", "address of the admin endpoints (/metrics, /checkpoints, /healthz, /readyz); empty disables")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if dc.rate <= 0 || dc.users <= 0 || dc.partitions <= 0 || dc.interval <= 0 {
		fmt.Fprintln(stderr, "demo: --rate, --users, --partitions and --interval must be positive")
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := runDemo(ctx, dc, stdout); err != nil {
		fmt.Fprintf(stderr, "demo: %v\n", err)
		return 1
	}
	return 0
}

const (
	demoJob    = "counts"
	demoInput  = "events"
	demoOutput = "counts"
)

func runDemo(ctx context.Context, dc demoConfig, out io.Writer) error {
	say := func(format string, a ...any) { fmt.Fprintf(out, format+"\n", a...) }
	if err := os.MkdirAll(dc.dataDir, 0o755); err != nil {
		return fmt.Errorf("data folder: %w", err)
	}
	cluster, err := startBroker(dc)
	if err != nil {
		return err
	}
	defer cluster.Close()
	addr := cluster.ListenAddrs()[0]
	say("Embedded Kafka (kfake) listening on %s, data in %s", addr, filepath.Join(dc.dataDir, "broker"))
	say("Watch the output:  kcat -b %s -C -t %s -X isolation.level=read_committed -f '%%k %%s\\n'", addr, demoOutput)

	admin, err := kgo.NewClient(kgo.SeedBrokers(addr))
	if err != nil {
		return err
	}
	defer admin.Close()
	adm := kadm.NewClient(admin)
	if err := ensureTopics(ctx, adm, int32(dc.partitions), demoInput, demoOutput); err != nil {
		return err
	}

	logFile, err := os.OpenFile(filepath.Join(dc.dataDir, "sluice.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("log file: %w", err)
	}
	defer logFile.Close()
	log := slog.New(slog.NewTextHandler(logFile, &slog.HandlerOptions{Level: slog.LevelInfo}))
	say("Logs go to %s", logFile.Name())

	c := service.DefaultConfig()
	c.Brokers = []string{addr}
	c.CheckpointDir = filepath.Join(dc.dataDir, "checkpoints")
	c.WorkDir = filepath.Join(dc.dataDir, "work")
	c.Settings.Interval = dc.interval
	c.AdminAddr = dc.admin
	job := example.CountJob(demoJob, demoInput, demoOutput)
	resumed, err := describeResume(ctx, c.CheckpointDir, dc.partitions)
	if err != nil {
		return err
	}
	say("%s", resumed)

	p, err := service.Start(ctx, job, c, log)
	if err != nil {
		return err
	}
	defer p.Close()

	var wg sync.WaitGroup
	bgCtx, stopBg := context.WithCancel(ctx)
	defer stopBg()
	var generated, visible atomic.Int64
	wg.Go(func() { generate(bgCtx, addr, dc, &generated) })
	wg.Go(func() { watchOutput(bgCtx, addr, &visible) })
	progressTopic := demoJob + "-progress"
	if k, ok := p.Sink.(*sink.Kafka); ok {
		progressTopic = k.ProgressTopic()
	}
	wg.Go(func() { trimTopics(bgCtx, adm, p.Storage, dc.partitions, progressTopic) })
	wg.Go(func() { progress(bgCtx, out, p.Instance, &generated, &visible) })

	if a := p.AdminAddr(); a != "" {
		say("Metrics: http://%s/metrics   checkpoint history: http://%s/checkpoints", a, a)
	}
	say("Running the count job over %d tasks; Ctrl-C stops it (final checkpoint), run again to resume.", dc.partitions)
	err = p.Run(ctx)
	stopBg()
	wg.Wait()
	if err != nil {
		return err
	}
	say("Stopped after a final checkpoint. Run `processor demo` again to resume.")
	return nil
}

// startBroker starts kfake on the demo's address with its data folder.
func startBroker(dc demoConfig) (*kfake.Cluster, error) {
	host, portStr, err := net.SplitHostPort(dc.listen)
	if err != nil {
		return nil, fmt.Errorf("--listen %q: %w", dc.listen, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return nil, fmt.Errorf("--listen %q: bad port", dc.listen)
	}
	c, err := kfake.NewCluster(
		kfake.NumBrokers(1),
		kfake.Ports(port),
		kfake.DataDir(filepath.Join(dc.dataDir, "broker")),
		kfake.ListenFn(func(network, _ string) (net.Listener, error) {
			return net.Listen(network, net.JoinHostPort(host, portStr))
		}),
	)
	if err != nil {
		return nil, fmt.Errorf("start the embedded Kafka on %s (is the port in use? try --listen 127.0.0.1:19092): %w", dc.listen, err)
	}
	return c, nil
}

func ensureTopics(ctx context.Context, adm *kadm.Client, partitions int32, topics ...string) error {
	existing, err := adm.ListTopics(ctx, topics...)
	if err != nil {
		return fmt.Errorf("list topics: %w", err)
	}
	for _, t := range topics {
		if d, ok := existing[t]; ok && d.Err == nil {
			continue
		}
		resp, err := adm.CreateTopic(ctx, partitions, 1, nil, t)
		if err == nil {
			err = resp.Err
		}
		if err != nil {
			return fmt.Errorf("create topic %s: %w", t, err)
		}
	}
	return nil
}

// describeResume says from which checkpoints the job will resume.
func describeResume(ctx context.Context, dir string, partitions int) (string, error) {
	st, err := coordinator.NewLocalStorage(dir)
	if err != nil {
		return "", err
	}
	var ids []int64
	for task := range partitions {
		got, err := coordinator.ListCheckpointIDs(ctx, st, demoJob, int32(task))
		if err != nil {
			return "", err
		}
		if len(got) > 0 {
			ids = append(ids, got[0])
		}
	}
	if len(ids) == 0 {
		return "No checkpoint yet: starting from the beginning of the input.", nil
	}
	return fmt.Sprintf("Resuming from the newest retained checkpoints in %s (task: checkpoint id) %v", dir, ids), nil
}

// generate writes events keyed by user id at the configured rate.
func generate(ctx context.Context, addr string, dc demoConfig, n *atomic.Int64) {
	cl, err := kgo.NewClient(kgo.SeedBrokers(addr), kgo.DefaultProduceTopic(demoInput))
	if err != nil {
		return
	}
	defer cl.Close()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	perTick := max(dc.rate/100, 1)
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		for range perTick {
			key := "user-" + strconv.Itoa(rand.IntN(dc.users))
			cl.Produce(ctx, &kgo.Record{Key: []byte(key), Value: []byte("click")}, func(_ *kgo.Record, err error) {
				if err == nil {
					n.Add(1)
				}
			})
		}
	}
}

// watchOutput counts the output records a read_committed consumer sees.
func watchOutput(ctx context.Context, addr string, n *atomic.Int64) {
	cl, err := kgo.NewClient(kgo.SeedBrokers(addr), kgo.ConsumeTopics(demoOutput),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		return
	}
	defer cl.Close()
	for ctx.Err() == nil {
		fs := cl.PollFetches(ctx)
		n.Add(int64(fs.NumRecords()))
	}
}

// keepOutput is how many of the newest records per partition the demo keeps
// of its output and progress topics.
const keepOutput = 50_000

// trimTopics keeps the in-memory broker small: it deletes input records below
// every task's oldest retained checkpoint, which no restore can need, and all
// but the newest keepOutput records of the output and progress topics.
func trimTopics(ctx context.Context, adm *kadm.Client, st coordinator.Storage, partitions int, progressTopic string) {
	tick := time.NewTicker(10 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		os := kadm.Offsets{}
		for task := range int32(partitions) {
			ids, err := coordinator.ListCheckpointIDs(ctx, st, demoJob, task)
			if err != nil || len(ids) == 0 {
				continue
			}
			oldest, err := coordinator.LoadCheckpoint(ctx, st, demoJob, task, ids[len(ids)-1])
			if err != nil {
				continue
			}
			if off, ok := oldest.Offsets[demoInput]; ok && off > 0 {
				os.Add(kadm.Offset{Topic: demoInput, Partition: task, At: off})
			}
		}
		if ends, err := adm.ListEndOffsets(ctx, demoOutput, progressTopic); err == nil {
			ends.Each(func(o kadm.ListedOffset) {
				if o.Err == nil && o.Offset > keepOutput {
					os.Add(kadm.Offset{Topic: o.Topic, Partition: o.Partition, At: o.Offset - keepOutput})
				}
			})
		}
		if len(os) > 0 {
			_, _ = adm.DeleteRecords(ctx, os)
		}
	}
}

// progress prints one line a second.
func progress(ctx context.Context, out io.Writer, in *coordinator.Instance, generated, visible *atomic.Int64) {
	start := time.Now()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var lastIn int64
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		var recIn, recOut, done, failed, lastID, lastNanos int64
		for _, s := range in.Stats() {
			recIn += s.RecordsIn.Load()
			recOut += s.RecordsOut.Load()
			done += s.CheckpointsCompleted.Load()
			failed += s.CheckpointsFailed.Load()
			if id := s.LastCheckpointID.Load(); id > lastID {
				lastID, lastNanos = id, s.LastCheckpointNanos.Load()
			}
		}
		fmt.Fprintf(out, "[%5s] generated %d | in %d (%d/s) | out %d | output visible to read_committed %d | checkpoints %d (last #%d took %s) | failed %d\n",
			time.Since(start).Round(time.Second), generated.Load(), recIn, recIn-lastIn, recOut, visible.Load(),
			done, lastID, time.Duration(lastNanos).Round(time.Millisecond), failed)
		lastIn = recIn
	}
}
