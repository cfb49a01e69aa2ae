// Package service runs a Sluice job as a process: it owns the command-line
// flags, wires the Kafka source, the sink, checkpoint storage and the state
// backend into the checkpoint coordinator, and handles signals. A user's own
// binary gets all of it from one call:
//
//	func main() {
//		job := operators.NewJob("counts")
//		... // sources, operators, sinks
//		service.Main(job)
//	}
package service

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/sluice-stream/sluice/coordinator"
	"github.com/sluice-stream/sluice/operators"
	"github.com/sluice-stream/sluice/sink"
	"github.com/sluice-stream/sluice/source"
	"github.com/sluice-stream/sluice/state"
)

// Config is everything a job process is configured with.
type Config struct {
	Brokers       []string
	CheckpointDir string
	WorkDir       string
	InstanceID    string
	Start         source.StartPosition
	Delivery      sink.Delivery
	// Sink, when set, replaces the Kafka sink (tests, the stdout sink).
	Sink sink.Sink
	// StateBackend is "pebble" or "memory".
	StateBackend string
	// StateCacheBytes is the Pebble block cache shared by the tasks.
	StateCacheBytes    int64
	TransactionTimeout time.Duration
	TxnIDPrefix        string
	ConnectTimeout     time.Duration
	Settings           coordinator.Settings
	LogFormat          string
	LogLevel           slog.Level
	// Hook injects crashes at protocol steps (tests only).
	Hook coordinator.Hook
	// GroupProtocol is "classic" (cooperative, Sluice's task balancer),
	// "consumer" (KIP-848, the broker assigns) or "none" (this instance runs
	// every task without joining the group).
	GroupProtocol string
	// SessionTimeout and RebalanceTimeout are the consumer group's; a
	// revoked task's final checkpoint is bounded by the rebalance timeout.
	SessionTimeout, RebalanceTimeout time.Duration
	// AdminAddr is where /healthz, /readyz, /metrics and /checkpoints are
	// served; empty disables them.
	AdminAddr string
	// S3 configures an s3://bucket/prefix CheckpointDir (CheckpointDir may
	// also be a local directory or file:///path; see
	// coordinator.OpenStorage). Credentials come from the standard AWS chain.
	S3 coordinator.StorageOptions
	// From, when set, is the savepoint or job checkpoint folder every task
	// restores from once (run --from); AllowNonRestoredState drops state
	// of operators the job no longer has instead of refusing to start.
	From                  string
	AllowNonRestoredState bool
	// Storage, when set, replaces the checkpoint storage CheckpointDir and
	// S3 locate (tests: fault injection with coordinator.FaultyStorage).
	Storage coordinator.Storage
}

// DefaultConfig returns the command line's defaults.
func DefaultConfig() Config {
	host, _ := os.Hostname()
	return Config{
		Brokers:            []string{"localhost:9092"},
		CheckpointDir:      "./sluice-checkpoints",
		WorkDir:            filepath.Join(os.TempDir(), "sluice"),
		InstanceID:         fmt.Sprintf("%s-%d", host, os.Getpid()),
		Delivery:           sink.ExactlyOnce,
		StateBackend:       "pebble",
		StateCacheBytes:    64 << 20,
		TransactionTimeout: 15 * time.Minute,
		TxnIDPrefix:        "sluice",
		ConnectTimeout:     15 * time.Second,
		Settings:           coordinator.DefaultSettings(),
		LogFormat:          "text",
		LogLevel:           slog.LevelInfo,
		GroupProtocol:      "classic",
		SessionTimeout:     10 * time.Second,
		RebalanceTimeout:   60 * time.Second,
	}
}

// RegisterFlags defines the flags of `run` on fs, writing into c.
func (c *Config) RegisterFlags(fs *flag.FlagSet) {
	fs.Func("brokers", "comma-separated Kafka seed brokers (default localhost:9092)", func(s string) error {
		c.Brokers = nil
		for b := range strings.SplitSeq(s, ",") {
			if b = strings.TrimSpace(b); b != "" {
				c.Brokers = append(c.Brokers, b)
			}
		}
		if len(c.Brokers) == 0 {
			return errors.New("no broker given")
		}
		return nil
	})
	registerStorageFlags(fs, &c.CheckpointDir, &c.S3) // --checkpoint-dir, --s3-*
	fs.StringVar(&c.WorkDir, "work-dir", c.WorkDir, "local folder for the tasks' working state")
	fs.StringVar(&c.InstanceID, "instance-id", c.InstanceID, "name of this instance in logs and checkpoint owners")
	fs.Func("start", "where a task without checkpoint starts: earliest or latest (default earliest)", func(s string) (err error) {
		c.Start, err = source.ParseStartPosition(s)
		return err
	})
	fs.Func("delivery", "output guarantee: exactly-once, at-least-once or none (default exactly-once)", func(s string) (err error) {
		c.Delivery, err = sink.ParseDelivery(s)
		return err
	})
	fs.StringVar(&c.StateBackend, "state", c.StateBackend, "state backend: pebble or memory")
	fs.DurationVar(&c.TransactionTimeout, "txn-timeout", c.TransactionTimeout, "Kafka transaction timeout of the sink (at most the broker's transaction.max.timeout.ms)")
	fs.StringVar(&c.TxnIDPrefix, "txn-prefix", c.TxnIDPrefix, "prefix of the sink's transactional ids")
	fs.DurationVar(&c.ConnectTimeout, "connect-timeout", c.ConnectTimeout, "how long to wait for the brokers, and for the checkpoint storage, at start")
	s := &c.Settings
	fs.DurationVar(&s.Interval, "interval", s.Interval, "checkpoint interval")
	fs.DurationVar(&s.Timeout, "checkpoint-timeout", s.Timeout, "timeout of one checkpoint's asynchronous part")
	fs.DurationVar(&s.MinPause, "min-pause", s.MinPause, "least pause between a checkpoint's completion and the next barrier")
	fs.IntVar(&s.MaxPending, "max-pending", s.MaxPending, "most checkpoints pending commit; the sink's pool has this many transactional ids plus one")
	fs.IntVar(&s.TolerableFailures, "tolerable-failures", s.TolerableFailures, "consecutive failed checkpoints before a task restarts from its newest complete checkpoint")
	fs.IntVar(&s.Retained, "retained", s.Retained, "complete checkpoints kept per task")
	fs.BoolVar(&s.CommitOffsets, "commit-offsets", s.CommitOffsets, "commit checkpointed offsets to the consumer group (lag monitoring only)")
	fs.DurationVar(&s.StopTimeout, "stop-timeout", s.StopTimeout, "bound of the final checkpoint on shutdown")
	fs.StringVar(&c.GroupProtocol, "group-protocol", c.GroupProtocol, "consumer group protocol: classic (cooperative, task-sticky), consumer (KIP-848) or none (run every task, no group)")
	fs.DurationVar(&c.SessionTimeout, "session-timeout", c.SessionTimeout, "consumer group session timeout")
	fs.DurationVar(&c.RebalanceTimeout, "rebalance-timeout", c.RebalanceTimeout, "consumer group rebalance timeout; bounds the final checkpoint of a revoked task")
	c.AdminAddr = ":8080" // the command line serves them by default; Start callers opt in
	fs.StringVar(&c.AdminAddr, "admin-addr", c.AdminAddr, "address of the admin HTTP endpoints (/healthz, /readyz, /metrics, /checkpoints); empty disables")
	fs.StringVar(&c.From, "from", c.From, "restore every task once from this savepoint or job checkpoint folder (<checkpoint-dir>/<job>); instances started again with the same --from do not import twice")
	fs.BoolVar(&c.AllowNonRestoredState, "allow-non-restored-state", c.AllowNonRestoredState, "with --from: drop state of operators this job no longer has instead of refusing to start")
	fs.StringVar(&c.LogFormat, "log-format", c.LogFormat, "log format: text or json")
	fs.TextVar(&c.LogLevel, "log-level", c.LogLevel, "log level: debug, info, warn or error")
}

// Validate reports flag values that cannot work, all at once.
func (c *Config) Validate() error {
	errs := []error{c.Settings.Validate()}
	errs = append(errs, checkStorageFlags(c.CheckpointDir, c.S3))
	if c.From != "" {
		if err := coordinator.ValidateLocation(c.From); err != nil {
			errs = append(errs, fmt.Errorf("--from: %w", err))
		}
	} else if c.AllowNonRestoredState {
		errs = append(errs, errors.New("--allow-non-restored-state needs --from"))
	}
	if c.StateBackend != "pebble" && c.StateBackend != "memory" {
		errs = append(errs, fmt.Errorf("--state %q: want pebble or memory", c.StateBackend))
	}
	if c.LogFormat != "text" && c.LogFormat != "json" {
		errs = append(errs, fmt.Errorf("--log-format %q: want text or json", c.LogFormat))
	}
	switch c.GroupProtocol {
	case "classic", "consumer", "none":
	default:
		errs = append(errs, fmt.Errorf("--group-protocol %q: want classic, consumer or none", c.GroupProtocol))
	}
	if c.TransactionTimeout <= 0 {
		errs = append(errs, fmt.Errorf("--txn-timeout must be positive, got %s", c.TransactionTimeout))
	}
	return errors.Join(errs...)
}

// NewLogger builds the process logger from the flags.
func (c *Config) NewLogger(w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: c.LogLevel}
	if c.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// Process is a started job: its instance runs until Run's context ends.
type Process struct {
	Instance *coordinator.Instance
	Source   *source.Source
	Sink     sink.Sink
	Storage  coordinator.Storage
	cfg      Config
	job      *operators.Job
	log      *slog.Logger
	input    *coordinator.KafkaInput
	control  *control
	admin    *admin
	close    []func()
}

// AdminAddr is the address the admin endpoints listen on ("" if disabled).
func (p *Process) AdminAddr() string {
	if p.admin == nil {
		return ""
	}
	return p.admin.Addr()
}

// Start connects to Kafka and storage and prepares every task of the job.
// Errors name what is wrong: a bad flag, an unreachable broker, an
// unwritable checkpoint directory, a missing input topic.
func Start(ctx context.Context, job *operators.Job, c Config, log *slog.Logger) (*Process, error) {
	if err := job.Validate(); err != nil {
		return nil, fmt.Errorf("job %s: %w", job.Name(), err)
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	p := &Process{cfg: c, job: job, log: log}
	ok := false
	defer func() {
		if !ok {
			p.Close()
		}
	}()
	storage := c.Storage
	if storage == nil {
		octx, cancel := ctx, context.CancelFunc(func() {})
		if c.ConnectTimeout > 0 {
			octx, cancel = context.WithTimeout(ctx, c.ConnectTimeout)
		}
		opened, err := coordinator.OpenStorage(octx, c.CheckpointDir, c.S3)
		cancel()
		if err != nil {
			return nil, err
		}
		storage = opened
	}
	p.Storage = storage
	src, err := source.New(ctx, source.Config{
		Brokers: c.Brokers, Group: job.Name(), Topics: job.Inputs(), Start: c.Start,
		ConnectTimeout: c.ConnectTimeout, Logger: log,
	})
	if err != nil {
		return nil, err
	}
	p.Source = src
	p.close = append(p.close, src.Close)

	settings := c.Settings
	p.Sink = c.Sink
	if p.Sink == nil {
		k, err := sink.NewKafka(ctx, sink.KafkaConfig{
			Brokers: c.Brokers, Job: job.Name(), TransactionalIDPrefix: c.TxnIDPrefix,
			PoolSize: settings.MaxPending + 1, TransactionTimeout: c.TransactionTimeout,
			Delivery: c.Delivery, Logger: log,
		})
		if err != nil {
			return nil, err
		}
		p.Sink = k
		if c.Delivery == sink.ExactlyOnce {
			settings.TransactionTimeout = c.TransactionTimeout
			warnTimeout(log, settings)
			if err := k.AbortOrphans(ctx, src.Partitions()); err != nil {
				return nil, err
			}
		}
	}
	p.close = append(p.close, p.Sink.Close)

	var factory state.Factory
	if c.StateBackend == "memory" {
		factory = state.NewMemoryFactory()
	} else {
		pf := state.NewPebbleFactory(c.StateCacheBytes)
		p.close = append(p.close, func() { pf.Close() })
		factory = pf
	}
	var tasks []int32 // with a group, the group assigns them
	if c.GroupProtocol == "none" {
		tasks = make([]int32, src.Partitions())
		for i := range tasks {
			tasks[i] = int32(i)
		}
	}
	if p.control, err = openControl(ctx, c.Brokers, job.Name(), log); err != nil {
		return nil, err
	}
	p.close = append(p.close, p.control.close)
	var imp *coordinator.ImportConfig
	if c.From != "" {
		imp = &coordinator.ImportConfig{From: c.From, AllowNonRestoredState: c.AllowNonRestoredState, Partitions: src.Partitions()}
	}
	locs := &locations{opts: c.S3}
	m := newMetrics()
	p.input = &coordinator.KafkaInput{Source: src}
	p.Instance = coordinator.NewInstance(coordinator.InstanceConfig{
		Job: job, Storage: storage, Sink: p.Sink, State: factory, Input: p.input,
		Tasks: tasks, WorkDir: filepath.Join(c.WorkDir, job.Name()), Settings: settings,
		ID: c.InstanceID, Hook: c.Hook, Log: log, Observe: m.observe,
		Partitions: src.Partitions(), Import: imp, OpenLocation: locs.Open,
	})
	m.instance = p.Instance
	if p.admin, err = startAdmin(c.AdminAddr, p.Instance, m, log); err != nil {
		return nil, err
	}
	if p.admin != nil {
		p.close = append(p.close, p.admin.close)
	}
	log.Info("job started", "job", job.Name(), "inputs", job.Inputs(), "outputs", job.Outputs(), "tasks", len(tasks),
		"brokers", c.Brokers, "checkpoints", storage.String(), "interval", settings.Interval, "delivery", c.Delivery)
	ok = true
	return p, nil
}

// warnTimeout warns when the pending checkpoints could outlive the
// transaction timeout in normal operation.
func warnTimeout(log *slog.Logger, s coordinator.Settings) {
	worst := s.Interval*time.Duration(s.MaxPending+1) + s.Timeout
	if worst > s.TransactionTimeout/2 {
		log.Warn("checkpoint interval × pending checkpoints plus the checkpoint timeout comes near the transaction timeout; slow checkpoints will fail the transaction-timeout guard",
			"interval", s.Interval, "max_pending", s.MaxPending, "checkpoint_timeout", s.Timeout, "txn_timeout", s.TransactionTimeout)
	}
}

// Run runs the job until ctx is done, then stops it gracefully: with a
// consumer group it leaves the group only after every task's final
// checkpoint, so the next owners neither lose nor replay anything.
func (p *Process) Run(ctx context.Context) error {
	srcCtx, stopSource := context.WithCancel(context.WithoutCancel(ctx))
	defer stopSource()
	srcDone := make(chan error, 1)
	go func() { srcDone <- p.Source.Run(srcCtx) }()
	defer func() { stopSource(); <-srcDone }()

	instCtx, stopInstance := context.WithCancel(context.WithoutCancel(ctx))
	defer stopInstance()
	ctlCtx, stopControl := context.WithCancel(instCtx)
	ctlDone := make(chan struct{})
	go func() { defer close(ctlDone); p.control.run(ctlCtx, p.Instance) }()
	defer func() { stopControl(); <-ctlDone }()
	instDone := make(chan error, 1)
	go func() { instDone <- p.Instance.Run(instCtx) }()

	var group *source.Membership
	if p.cfg.GroupProtocol != "none" {
		var err error
		group, err = source.JoinGroup(source.GroupConfig{
			Brokers: p.cfg.Brokers, Group: p.job.Name(), Topics: p.job.Inputs(),
			ServerSide: p.cfg.GroupProtocol == "consumer", SessionTimeout: p.cfg.SessionTimeout,
			RebalanceTimeout: p.cfg.RebalanceTimeout, Logger: p.log,
			OnAssigned: p.Instance.Assign,
			OnRevoked: func(ctx context.Context, tasks []int32) {
				// Past the rebalance timeout the group moves the tasks
				// anyway; the next owner then recovers them.
				ctx, cancel := context.WithTimeout(ctx, p.cfg.RebalanceTimeout*9/10)
				defer cancel()
				p.Instance.Revoke(ctx, tasks)
			},
			OnLost: p.Instance.Lose,
		})
		if err != nil {
			stopInstance()
			<-instDone
			return err
		}
		p.input.UseGroup(group)
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-instDone:
		instDone <- err
	}
	if group != nil {
		group.Close() // revokes every task gracefully, then leaves
	}
	stopInstance()
	return <-instDone
}

// Close releases clients and caches.
func (p *Process) Close() {
	for i := len(p.close) - 1; i >= 0; i-- {
		p.close[i]()
	}
	p.close = nil
}

// Main is a user binary's whole main: it parses `run [flags]` from the
// command line, runs job until SIGINT or SIGTERM, and exits with status 1 and
// a clear message on any error (2 for bad flags). The tool commands, such as
// `checkpoints list`, work on job's storage (see ToolCommand).
func Main(job *operators.Job) {
	args := os.Args[1:]
	if len(args) > 0 && IsToolCommand(args[0]) {
		os.Exit(runTool(args, toolEnv{stdout: os.Stdout, stderr: os.Stderr, job: job}))
	}
	if len(args) > 0 && args[0] == "run" {
		args = args[1:]
	}
	os.Exit(RunCommand(args, os.Stderr, func(*flag.FlagSet) func() *operators.Job {
		return func() *operators.Job { return job }
	}))
}

// RunCommand parses the flags of `run`, runs the job until a signal, and
// returns the exit status. jobFlags may define the job's own flags and
// returns the function that builds the job once they are parsed.
func RunCommand(args []string, stderr io.Writer, jobFlags func(*flag.FlagSet) func() *operators.Job) int {
	c := DefaultConfig()
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	c.RegisterFlags(fs)
	build := jobFlags(fs)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	job := build()
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "run: unexpected arguments %q\n", fs.Args())
		return 2
	}
	if err := c.Validate(); err != nil {
		fmt.Fprintf(stderr, "run: %v\n", err)
		return 2
	}
	log := c.NewLogger(stderr)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	p, err := Start(ctx, job, c, log)
	if err != nil {
		fmt.Fprintf(stderr, "run: %v\n", err)
		return 1
	}
	defer p.Close()
	if err := p.Run(ctx); err != nil {
		fmt.Fprintf(stderr, "run: %v\n", err)
		return 1
	}
	// The records this process read, over every task it ran: summed over
	// a job's processes it shows replays (tests, capacity planning).
	var in int64
	for _, st := range p.Instance.Stats() {
		in += st.RecordsIn.Load()
	}
	log.Info("job stopped", "records_in", in)
	return 0
}
