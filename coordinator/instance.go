package coordinator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/sluice-stream/sluice/operators"
	"github.com/sluice-stream/sluice/sink"
	"github.com/sluice-stream/sluice/source"
	"github.com/sluice-stream/sluice/state"
)

// ErrLost is the cause with which a task is stopped when the instance lost
// it without a rebalance (its group session expired): another owner may
// already run it, so it stops at once, without a final checkpoint.
var ErrLost = errors.New("task lost: another owner may run it")

// InstanceConfig configures the tasks one process runs.
type InstanceConfig struct {
	Job     *operators.Job
	Storage Storage
	Sink    sink.Sink
	State   state.Factory
	Input   Input
	// Tasks, when set, are run from the start (a single instance owning
	// every task); with a consumer group, Assign and Revoke drive the tasks.
	Tasks []int32
	// WorkDir holds the tasks' local state.
	WorkDir  string
	Settings Settings
	// ID names the instance in checkpoint owners and logs.
	ID   string
	Hook Hook
	Log  *slog.Logger
	// Observe, when set, is called with every finished checkpoint (metrics).
	Observe func(CheckpointRecord)
	// Partitions is the job's number of tasks (input partitions).
	Partitions int32
	// Import, when set, restores every task once from a savepoint or
	// another job's checkpoints (run --from).
	Import *ImportConfig
	// OpenLocation opens the storage at a location (savepoints, imports).
	OpenLocation func(ctx context.Context, location string) (Storage, error)
}

// Instance is the checkpoint coordinator of one process: it triggers the
// barriers of its tasks, starts tasks when they are assigned, stops them
// with a final checkpoint when they are revoked, and restarts a task that
// fails, which makes it recover from its newest complete checkpoint.
type Instance struct {
	cfg InstanceConfig
	log *slog.Logger

	mu      sync.Mutex
	ctx     context.Context // the running instance's context; nil before Run
	fail    context.CancelCauseFunc
	running map[int32]*runningTask
	// assigned: Assign was called at least once (the group's first
	// assignment arrived, or the fixed tasks were started).
	assigned bool
	stats    map[int32]*TaskStats // kept across incarnations and assignments
	wg       sync.WaitGroup
	started  chan struct{}
	// savepoints records the savepoint requests received.
	savepoints *savepointControl
}

// runningTask is an assigned task and its supervisor.
type runningTask struct {
	stop    context.CancelCauseFunc
	done    chan struct{}
	trigger chan struct{}
	// requests carries savepoint requests to the task's incarnations.
	requests chan SavepointRequest
}

// NewInstance prepares an instance; Run runs it.
func NewInstance(cfg InstanceConfig) *Instance {
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	stats := make(map[int32]*TaskStats, len(cfg.Tasks))
	for _, t := range cfg.Tasks {
		stats[t] = &TaskStats{observe: cfg.Observe}
	}
	return &Instance{cfg: cfg, log: log, running: map[int32]*runningTask{}, stats: stats, started: make(chan struct{}), savepoints: newSavepointControl()}
}

// Stats returns the counters of every task this instance has run, by task.
func (in *Instance) Stats() map[int32]*TaskStats {
	in.mu.Lock()
	defer in.mu.Unlock()
	return maps.Clone(in.stats)
}

// Tasks returns the tasks assigned to this instance now, sorted.
func (in *Instance) Tasks() []int32 {
	in.mu.Lock()
	defer in.mu.Unlock()
	return slices.Sorted(maps.Keys(in.running))
}

// Ready reports whether the instance has its tasks (the group's first
// assignment arrived, or its fixed tasks were started) and every one of them
// is restored and processing. Before the first assignment it is not ready:
// a rolling restart gated on readiness must not move on while this
// instance has not yet taken its share.
func (in *Instance) Ready() bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.ctx == nil || !in.assigned {
		return false
	}
	for task := range in.running {
		if !in.stats[task].Running.Load() {
			return false
		}
	}
	return true
}

// Run runs the instance until ctx is done, then stops every task gracefully
// (final checkpoint and commit). An error that a restart cannot cure (input
// gone) stops the instance and is returned.
func (in *Instance) Run(ctx context.Context) error {
	if err := in.cfg.Settings.Validate(); err != nil {
		return err
	}
	ctx, fail := context.WithCancelCause(ctx)
	defer fail(nil)
	in.mu.Lock()
	in.ctx, in.fail = context.WithoutCancel(ctx), fail
	in.mu.Unlock()
	close(in.started)
	if in.cfg.Tasks != nil {
		in.Assign(in.cfg.Tasks)
	}
	in.trigger(ctx)

	stopCtx, cancel := context.WithTimeout(context.Background(), in.cfg.Settings.StopTimeout+time.Second)
	defer cancel()
	in.Revoke(stopCtx, in.Tasks())
	in.wg.Wait()
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// trigger asks every task for a barrier once per interval until ctx is done;
// a busy task finds the request when it gets to it.
func (in *Instance) trigger(ctx context.Context) {
	tick := time.NewTicker(in.cfg.Settings.Interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if in.stoppedWithSavepoint() {
			return
		}
		in.mu.Lock()
		for _, r := range in.running {
			select {
			case r.trigger <- struct{}{}:
			default:
			}
		}
		in.mu.Unlock()
	}
}

// RequestSavepoint passes a savepoint request to every task of the
// instance; each writes its part at its next barrier, after its
// transactions are committed. A request seen before is passed on again
// (the savepoint command repeats its request for tasks that moved), but a
// task writes its part only once. Requests for another job are ignored.
func (in *Instance) RequestSavepoint(r SavepointRequest) {
	if r.Job != in.cfg.Job.Name() {
		return
	}
	if in.savepoints.add(r) {
		in.log.Info("savepoint requested", "savepoint", r.ID, "location", r.Location, "stop", r.Stop)
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	for task, rt := range in.running {
		select {
		case rt.requests <- r:
		default:
			in.log.Warn("savepoint request not passed on: the task has too many waiting; it is answered when the request comes again", "task", task, "savepoint", r.ID)
		}
	}
}

// stoppedWithSavepoint reports whether a stop-with-savepoint request arrived
// and every task of the instance has stopped with it: the instance is done.
func (in *Instance) stoppedWithSavepoint() bool {
	if !in.savepoints.stopping() {
		return false
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	for task := range in.running {
		if !in.stats[task].Stopped.Load() {
			return false
		}
	}
	in.log.Info("every task of this instance stopped with the savepoint; stopping")
	return true
}

// Assign starts the given tasks (those not running yet); it may be called
// with none (the group assigned nothing new). It waits for Run to have
// started.
func (in *Instance) Assign(tasks []int32) {
	<-in.started
	in.mu.Lock()
	defer in.mu.Unlock()
	in.assigned = true
	for _, task := range tasks {
		if in.running[task] != nil {
			continue
		}
		if in.stats[task] == nil {
			in.stats[task] = &TaskStats{observe: in.cfg.Observe}
		}
		ctx, stop := context.WithCancelCause(in.ctx)
		r := &runningTask{stop: stop, done: make(chan struct{}), trigger: make(chan struct{}, 1), requests: make(chan SavepointRequest, 8)}
		in.running[task] = r
		in.wg.Go(func() {
			defer close(r.done)
			if err := in.supervise(ctx, task, r); err != nil {
				in.fail(err)
			}
		})
		in.log.Info("task assigned", "task", task)
	}
}

// Revoke stops the given tasks gracefully: each takes a final checkpoint and
// commits it before Revoke returns, so the next owner neither loses nor
// replays anything. The final checkpoints are bounded by ctx (and by
// Settings.StopTimeout): past ctx's deadline the remaining tasks stop at
// once without it, and the next owner recovers them.
func (in *Instance) Revoke(ctx context.Context, tasks []int32) {
	in.stopTasks(tasks, revoked{ctx})
}

// revoked is the cause with which a revoked task's context is cancelled: a
// graceful stop (it is context.Canceled to errors.Is) whose final checkpoint
// must be done before the revoke's context ends (see stopBound).
type revoked struct{ ctx context.Context }

func (revoked) Error() string { return "task revoked" }

func (revoked) Unwrap() error { return context.Canceled }

// Lose stops the given tasks at once, without a final checkpoint: the group
// session was lost and another owner may already run them.
func (in *Instance) Lose(tasks []int32) {
	in.stopTasks(tasks, ErrLost)
}

// stopTasks cancels the tasks' contexts with cause and waits until they are
// done; a revoked task bounds its final checkpoint itself.
func (in *Instance) stopTasks(tasks []int32, cause error) {
	in.mu.Lock()
	var stopping []*runningTask
	for _, task := range tasks {
		if r := in.running[task]; r != nil {
			delete(in.running, task)
			r.stop(cause)
			stopping = append(stopping, r)
		}
	}
	in.mu.Unlock()
	for _, r := range stopping {
		<-r.done
	}
	if len(tasks) > 0 {
		in.log.Info("tasks released", "tasks", tasks, "graceful", !errors.Is(cause, ErrLost))
	}
}

// supervise runs incarnations of one task until its context ends.
func (in *Instance) supervise(ctx context.Context, task int32, r *runningTask) error {
	const minBackoff, maxBackoff = 50 * time.Millisecond, 5 * time.Second
	backoff := minBackoff
	for n := 1; ; n++ {
		started := time.Now()
		in.mu.Lock()
		st := in.stats[task]
		in.mu.Unlock()
		// An incarnation that crashed took its queued requests with it.
		for _, req := range in.savepoints.outstanding(task) {
			select {
			case r.requests <- req:
			default:
			}
		}
		t := NewTask(TaskConfig{
			Job: in.cfg.Job, Task: task, Storage: in.cfg.Storage, Sink: in.cfg.Sink, State: in.cfg.State,
			Input: in.cfg.Input, Settings: in.cfg.Settings, Trigger: r.trigger, Hook: in.cfg.Hook, Log: in.log,
			Partitions: in.cfg.Partitions, Import: in.cfg.Import, OpenLocation: in.cfg.OpenLocation, requests: r.requests, control: in.savepoints,
			WorkDir: filepath.Join(in.cfg.WorkDir, "task-"+strconv.Itoa(int(task))),
			Owner:   fmt.Sprintf("%s/task-%d/%d-%d", in.cfg.ID, task, time.Now().UnixNano(), n),
			Stats:   st,
		})
		err := t.Run(ctx)
		if ctx.Err() != nil {
			if err != nil && !errors.Is(err, ErrLost) {
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
		if errors.Is(err, ErrTakenOver) || (errors.Is(err, sink.ErrFenced) && !errors.Is(err, sink.ErrTransactionLost)) {
			// Another owner claimed the task, or fenced its producers
			// (which it does only after claiming it). Take it back only if
			// it is still ours after a while (the group decides), so two
			// owners do not keep fencing each other. (A transaction found
			// lost restarts at once: its input must be replayed.)
			backoff = maxBackoff
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
