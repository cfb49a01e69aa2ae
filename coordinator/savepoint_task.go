package coordinator

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"
)

// savepointControl is an instance's record of savepoint requests, shared by
// its tasks: which parts were written, and which stop requests arrived
// while the instance ran (those make it leave tasks stopped by them idle).
type savepointControl struct {
	mu       sync.Mutex
	requests map[string]SavepointRequest
	received map[string]time.Time
	written  map[string]map[int32]bool
}

// redeliverFor is how long after its arrival a request is passed to a
// restarted task incarnation that has not written its part (the one that
// had it queued crashed); the savepoint command gives up long before.
const redeliverFor = 15 * time.Minute

func newSavepointControl() *savepointControl {
	return &savepointControl{requests: map[string]SavepointRequest{}, received: map[string]time.Time{}, written: map[string]map[int32]bool{}}
}

// add records a request; it reports false for one seen before.
func (c *savepointControl) add(r SavepointRequest) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.requests[r.ID]; ok {
		return false
	}
	c.requests[r.ID] = r
	c.received[r.ID] = time.Now()
	return true
}

// outstanding returns the recent requests a task has not written its part
// of, oldest first.
func (c *savepointControl) outstanding(task int32) []SavepointRequest {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []SavepointRequest
	for id, r := range c.requests {
		if !c.written[id][task] && time.Since(c.received[id]) < redeliverFor {
			out = append(out, r)
		}
	}
	slices.SortFunc(out, func(a, b SavepointRequest) int { return c.received[a.ID].Compare(c.received[b.ID]) })
	return out
}

// stopRequest returns the stop request with that id, if this instance
// received it.
func (c *savepointControl) stopRequest(id string) (SavepointRequest, bool) {
	if c == nil {
		return SavepointRequest{}, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	r, ok := c.requests[id]
	return r, ok && r.Stop
}

// stopping reports whether a stop request arrived.
func (c *savepointControl) stopping() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, r := range c.requests {
		if r.Stop {
			return true
		}
	}
	return false
}

func (c *savepointControl) markWritten(id string, task int32) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.written[id] == nil {
		c.written[id] = map[int32]bool{}
	}
	c.written[id][task] = true
}

func (c *savepointControl) isWritten(id string, task int32) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.written[id][task]
}

// savepointResult reports the outcome of a barrier that carried a savepoint
// request, from the checkpointer to the task.
type savepointResult struct {
	id  string
	err error
}

// onSavepointRequest queues a request; a stop request also ends record
// processing at once (the caller stops reading batches), so the stop
// barrier is the last.
func (t *Task) onSavepointRequest(ctx context.Context, r SavepointRequest) error {
	if t.cfg.control.isWritten(r.ID, t.cfg.Task) {
		return nil
	}
	for _, q := range t.savepoints {
		if q.ID == r.ID {
			return nil
		}
	}
	t.log.Info("savepoint requested", "savepoint", r.ID, "location", r.Location, "stop", r.Stop)
	if t.stopped {
		// Idle since an earlier stop: the state is that of the stop
		// checkpoint, whose transactions are committed.
		return t.writePartFromStore(ctx, r)
	}
	t.savepoints = append(t.savepoints, r)
	return t.maybeBarrier(ctx)
}

// onSavepointDone handles the outcome of a savepoint barrier: the part is
// written (a stop request stops the task), or the next barrier tries again.
func (t *Task) onSavepointDone(res savepointResult) {
	if res.id != t.spInFlight {
		return
	}
	t.spInFlight = ""
	if res.err != nil {
		t.log.Warn("savepoint part not written; the next barrier tries again", "savepoint", res.id, "err", res.err)
		return
	}
	r := t.savepoints[0]
	t.savepoints = t.savepoints[1:]
	t.partWritten(r)
	if r.Stop {
		t.stop(r)
	}
}

// partWritten records that the task's part of r is in storage. A stopped
// task counts as stopped for its instance only from then on: the
// instance ends when every task is.
func (t *Task) partWritten(r SavepointRequest) {
	t.cfg.control.markWritten(r.ID, t.cfg.Task)
	t.log.Info("savepoint part written", "savepoint", r.ID, "location", r.Location)
	if t.stopped && r.ID == t.stoppedBy.ID {
		t.st.Stopped.Store(true)
	}
}

// stopRequested reports whether the task must not process records: it is
// stopped, or a stop request waits for its barrier.
func (t *Task) stopRequested() bool {
	if t.stopped {
		return true
	}
	for _, r := range t.savepoints {
		if r.Stop {
			return true
		}
	}
	return false
}

// stopInFlight reports whether the barrier of a stop request is being
// completed.
func (t *Task) stopInFlight() bool {
	return t.spInFlight != "" && t.savepoints[0].Stop
}

func (t *Task) stop(r SavepointRequest) {
	t.stopped, t.stoppedBy = true, r
	if t.cfg.control.isWritten(r.ID, t.cfg.Task) {
		t.st.Stopped.Store(true)
	}
	t.log.Info("task stopped with savepoint; it processes nothing more", "savepoint", r.ID)
}

// retryStopPart runs at every trigger of a stopped task until its part of
// the stop savepoint is written.
func (t *Task) retryStopPart(ctx context.Context) error {
	if t.st.Stopped.Load() {
		return nil
	}
	return t.writePartFromStore(ctx, t.stoppedBy)
}

// resumeStopped runs after a takeover: a task whose newest checkpoint is the
// barrier of a stop request this instance received stays stopped (another
// instance of the stopping job handed it over), and writes its part if the
// previous owner did not get to it.
func (t *Task) resumeStopped(ctx context.Context, from *Checkpoint) error {
	r, ok := t.cfg.control.stopRequest(from.StoppedBy)
	if !ok {
		return nil
	}
	t.stop(r)
	return t.writePartFromStore(ctx, r)
}

// writePartFromStore writes a stopped task's part from its live store, which
// holds exactly the state of its newest checkpoint (nothing was processed
// since).
func (t *Task) writePartFromStore(ctx context.Context, r SavepointRequest) error {
	part := SavepointPart{Job: t.job, SavepointID: r.ID, Task: t.cfg.Task, Partitions: t.cfg.Partitions, CheckpointID: t.nextID - 1, Offsets: maps.Clone(t.position)}
	if err := t.writePart(ctx, r, part, scanStore(t.store)); err != nil {
		t.log.Warn("savepoint part not written; trying again", "savepoint", r.ID, "err", err)
		return nil
	}
	t.partWritten(r)
	return nil
}

func (t *Task) writePart(ctx context.Context, r SavepointRequest, part SavepointPart, scan func(fn func(key, value []byte) error) error) error {
	if t.cfg.OpenLocation == nil {
		return errors.New("no storage opener configured")
	}
	st, err := t.cfg.OpenLocation(ctx, r.Location)
	if err != nil {
		return fmt.Errorf("savepoint %s: %w", r.ID, err)
	}
	return WriteSavepointPart(ctx, st, part, partTmpDir(t.cfg.WorkDir), scan)
}
