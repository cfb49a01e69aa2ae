package coordinator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/sluice-stream/sluice/operators"
	"github.com/sluice-stream/sluice/sink"
	"github.com/sluice-stream/sluice/source"
	"github.com/sluice-stream/sluice/state"
)

// InstanceConfig configures the tasks one process runs.
type InstanceConfig struct {
	Job     *operators.Job
	Storage Storage
	Sink    sink.Sink
	State   state.Factory
	Input   Input
	// Tasks are the task numbers (partition indexes) this instance runs.
	Tasks []int32
	// WorkDir holds the tasks' local state.
	WorkDir  string
	Settings Settings
	// ID names the instance in checkpoint owners and logs.
	ID   string
	Hook Hook
	Log  *slog.Logger
}

// Instance is the checkpoint coordinator of one process: it triggers the
// barriers of all its tasks and restarts a task that fails, which makes the
// task recover from its newest complete checkpoint.
type Instance struct {
	cfg   InstanceConfig
	log   *slog.Logger
	stats map[int32]*TaskStats
}

// NewInstance prepares an instance; Run runs it.
func NewInstance(cfg InstanceConfig) *Instance {
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	stats := make(map[int32]*TaskStats, len(cfg.Tasks))
	for _, t := range cfg.Tasks {
		stats[t] = &TaskStats{}
	}
	return &Instance{cfg: cfg, log: log, stats: stats}
}

// Stats returns the counters of every task, by task number.
func (in *Instance) Stats() map[int32]*TaskStats { return in.stats }

// Run runs every task until ctx is done, then stops them gracefully (final
// checkpoint and commit). A task that fails is restarted with backoff; an
// error that a restart cannot cure (input gone) stops the instance.
func (in *Instance) Run(ctx context.Context) error {
	if err := in.cfg.Settings.Validate(); err != nil {
		return err
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	triggers := make(map[int32]chan struct{}, len(in.cfg.Tasks))
	for _, t := range in.cfg.Tasks {
		triggers[t] = make(chan struct{}, 1)
	}
	var wg sync.WaitGroup
	wg.Go(func() { in.trigger(ctx, triggers) })
	for _, task := range in.cfg.Tasks {
		wg.Go(func() {
			if err := in.supervise(ctx, task, triggers[task]); err != nil {
				cancel(err)
			}
		})
	}
	wg.Wait()
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// trigger asks every task for a barrier once per interval; a task that is
// still busy simply finds the request when it gets to it.
func (in *Instance) trigger(ctx context.Context, triggers map[int32]chan struct{}) {
	tick := time.NewTicker(in.cfg.Settings.Interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			for _, c := range triggers {
				select {
				case c <- struct{}{}:
				default:
				}
			}
		}
	}
}

// supervise runs incarnations of one task until ctx is done.
func (in *Instance) supervise(ctx context.Context, task int32, trigger chan struct{}) error {
	const minBackoff, maxBackoff = 50 * time.Millisecond, 5 * time.Second
	backoff := minBackoff
	for n := 1; ; n++ {
		started := time.Now()
		t := NewTask(TaskConfig{
			Job: in.cfg.Job, Task: task, Storage: in.cfg.Storage, Sink: in.cfg.Sink, State: in.cfg.State,
			Input: in.cfg.Input, Settings: in.cfg.Settings, Trigger: trigger, Hook: in.cfg.Hook, Log: in.log,
			WorkDir: filepath.Join(in.cfg.WorkDir, "task-"+strconv.Itoa(int(task))),
			Owner:   fmt.Sprintf("%s/task-%d/%d-%d", in.cfg.ID, task, time.Now().UnixNano(), n),
			Stats:   in.stats[task],
		})
		err := t.Run(ctx)
		if ctx.Err() != nil {
			if err != nil {
				in.log.Warn("task stopped with an error; the next owner recovers it", "task", task, "err", err)
			}
			return nil
		}
		if err == nil {
			return nil
		}
		if errors.Is(err, source.ErrInputGone) {
			in.log.Error("task cannot recover: its input is gone", "task", task, "err", err)
			return err
		}
		if time.Since(started) > time.Minute || errors.Is(err, ErrCrash) {
			backoff = minBackoff
		}
		level := slog.LevelError
		if errors.Is(err, ErrCrash) {
			level = slog.LevelWarn
		}
		in.log.Log(ctx, level, "task failed; restarting it from its newest complete checkpoint", "task", task, "incarnation", n, "backoff", backoff, "err", err)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
	}
}
