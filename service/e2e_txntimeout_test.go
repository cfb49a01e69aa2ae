package service_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/sluice-stream/sluice/coordinator"
	"github.com/sluice-stream/sluice/internal/kafkatest"
)

// TestE2ETransactionTimeoutGuard proves DESIGN's rule "a checkpoint whose
// oldest pending transaction could reach the broker's transaction timeout
// before commit must not complete: fail it instead" on a broker whose
// transaction.max.timeout.ms is 3 s (sink transaction timeout 3 s).
//
// The checkpoint storage stalls (an outage) right after a checkpoint with
// output pre-committed, before its upload, and stays stalled until the
// broker's timeout aborted that transaction (polled with kadm, not slept).
// When storage comes back, the checkpoint must fail instead of completing.
// It proves that
//   - the task counted the failed checkpoint (TaskStats.CheckpointsFailed)
//     and no metadata was created for it;
//   - the stalled transaction was indeed aborted by the broker (its marker
//     is in the progress topic but not visible to read_committed), and
//     every transaction that any complete checkpoint lists is committed
//     (its marker is visible): no complete checkpoint depends on an
//     aborted transaction;
//   - after the task restarted from its newest complete checkpoint, nothing
//     was lost or duplicated (read_committed reader, final state).
//
// One partition: with one task, the only storage operation the stall can
// catch is that checkpoint's upload.
func TestE2ETransactionTimeoutGuard(t *testing.T) {
	e := newE2EEnv(t, 1, kfake.BrokerConfigs(map[string]string{"transaction.max.timeout.ms": "3000"}))
	fs := coordinator.NewFaultyStorage(e2eLocalStorage(t, e.ckptDir))

	var (
		mu       sync.Mutex
		armed    bool
		dirty    bool  // output written since the last barrier
		stallID  int64 // checkpoint whose upload is stalled
		stalled  = make(chan struct{})
		stallSet sync.Once
	)
	hook := func(_ int32, s coordinator.Step, id int64) error {
		mu.Lock()
		defer mu.Unlock()
		switch s {
		case coordinator.StepRecord:
			dirty = true
		case coordinator.StepBarrier:
			if armed && dirty && stallID == 0 {
				stallID = id
			}
			dirty = false
		case coordinator.StepPreCommitted:
			if id == stallID {
				stallSet.Do(func() {
					fs.Stall() // the upload that follows blocks
					close(stalled)
				})
			}
		}
		return nil
	}
	c := e.config()
	c.TransactionTimeout = 3 * time.Second
	c.Settings.Interval = 100 * time.Millisecond
	c.Settings.Timeout = 30 * time.Second // the stall must not time the checkpoint out first
	c.Settings.Retained = 1000            // keep every complete checkpoint for the check
	c.Storage = fs
	c.Hook = hook
	log, logBuf := e2eLoggerBuf(t)
	j := e2eStart(t, c, log)
	stats := j.stats(t, 0)
	stream := kafkatest.NewStream(t, e.addr, e2eInput, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := stream.Produce(ctx, 200); err != nil {
		t.Fatal(err)
	}
	e2eWaitOutput(t, e, stream, 30*time.Second)

	mu.Lock()
	armed = true
	mu.Unlock()
	if err := stream.Produce(ctx, 100); err != nil {
		t.Fatal(err)
	}
	select {
	case <-stalled:
	case <-ctx.Done():
		t.Fatal("no checkpoint with output was stalled")
	}
	stallStart := time.Now()
	// Stay stalled until the broker aborted every transaction of the task
	// (the stalled one first of all: it is the oldest).
	e2eWaitFor(t, 30*time.Second, "the broker's transaction timeout to abort the stalled transaction", func() bool {
		return len(e2eOngoing(t, e.addr)) == 0 && fs.Waiting() > 0
	})
	t.Logf("storage stalled %s, until the broker aborted the open transactions", time.Since(stallStart).Round(time.Millisecond))
	if failed := stats.CheckpointsFailed.Load(); failed != 0 {
		t.Fatalf("%d checkpoints failed before the storage came back", failed)
	}
	fs.Unstall()

	// Recovery: more input, everything visible once.
	if err := stream.Produce(ctx, 100); err != nil {
		t.Fatal(err)
	}
	e2eWaitOutput(t, e, stream, 60*time.Second)
	if err := j.stop(); err != nil {
		t.Fatalf("job: %v", err)
	}

	st := e2eLocalStorage(t, e.ckptDir)
	mu.Lock()
	id := stallID
	mu.Unlock()
	if c, err := coordinator.LoadCheckpoint(context.Background(), st, e2eJob, 0, id); err == nil && c.Kind != coordinator.KindClaim {
		t.Fatalf("the stalled checkpoint %d completed (%s by %s)", id, c.Kind, c.Owner)
	} else if err != nil && !errors.Is(err, coordinator.ErrNotFound) {
		t.Fatal(err)
	}

	if stats.CheckpointsFailed.Load() == 0 {
		t.Fatal("no checkpoint failed")
	}
	if !strings.Contains(logBuf.String(), "CHECKPOINT FAILED by the transaction-timeout guard") {
		t.Fatal("the checkpoint did not fail by the transaction-timeout guard (no such log line)")
	}

	markers, committed := e2eMarkers(t, e.addr)
	aborted := 0
	for _, m := range markers {
		if m.Task == 0 && m.Checkpoint == id && !committed[e2ePos{m.Partition, m.Offset}] {
			aborted++
		}
	}
	if aborted == 0 {
		t.Fatalf("the transaction of the stalled checkpoint %d was not aborted by the broker: nothing was proven", id)
	}
	ids, err := coordinator.ListCheckpointIDs(context.Background(), st, e2eJob, 0)
	if err != nil {
		t.Fatal(err)
	}
	listed := 0
	for _, cid := range ids {
		c, err := coordinator.LoadCheckpoint(context.Background(), st, e2eJob, 0, cid)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range c.Pending {
			listed++
			mk := p.Committable.Marker
			if !committed[e2ePos{mk.Partition, mk.Offset}] {
				t.Errorf("complete checkpoint %d (%s) lists the transaction of checkpoint %d (%s), which is not committed (marker %d@%d not visible to read_committed)",
					cid, c.Kind, p.CheckpointID, p.Committable.TransactionalID, mk.Partition, mk.Offset)
			}
		}
	}
	t.Logf("stalled checkpoint %d failed; %d checkpoints failed in all; %d complete checkpoints list %d transactions, all committed",
		id, stats.CheckpointsFailed.Load(), len(ids), listed)
	e2eCheckExactlyOnce(t, e, stream.Want())
	e2eCheckFinalState(t, st, 1, int64(stream.Total()), stream.Want())
}
