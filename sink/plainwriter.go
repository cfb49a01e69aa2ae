package sink

import (
	"context"
	"fmt"
	"sync"

	"github.com/twmb/franz-go/pkg/kgo"
)

// plainWriter is the at-least-once or no-guarantee writer of a task: one
// non-transactional client.
type plainWriter struct {
	task    int32
	client  *kgo.Client
	ctx     context.Context
	stop    context.CancelFunc
	atLeast bool
	stats   counters

	// cur collects the records since the last barrier; owned by the task
	// goroutine.
	cur *batch

	mu       sync.Mutex
	firstErr error // None: first produce error so far
}

var (
	_ Writer        = (*plainWriter)(nil)
	_ StatsReporter = (*plainWriter)(nil)
)

func newPlainWriter(k *Kafka, task int32) (*plainWriter, error) {
	atLeast := k.cfg.Delivery == AtLeastOnce
	opts := append([]kgo.Opt{kgo.ProducerLinger(linger)}, k.opts()...)
	opts = append(opts, kgo.RecordPartitioner(kgo.StickyKeyPartitioner(nil)))
	if atLeast {
		// Idempotent (the default) needs acks=all.
		opts = append(opts, kgo.RequiredAcks(kgo.AllISRAcks()))
	} else {
		opts = append(opts, kgo.RequiredAcks(kgo.LeaderAck()), kgo.DisableIdempotentWrite())
	}
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, err
	}
	w := &plainWriter{task: task, client: cl, atLeast: atLeast}
	w.ctx, w.stop = context.WithCancel(context.Background())
	w.cur = newBatch(&w.stats)
	return w, nil
}

// Write produces r asynchronously.
func (w *plainWriter) Write(r *kgo.Record) {
	w.stats.records.Add(1)
	b := w.cur
	b.add()
	if w.atLeast {
		w.client.Produce(w.ctx, r, b.promise)
		return
	}
	w.client.Produce(w.ctx, r, func(_ *kgo.Record, err error) {
		if err != nil {
			w.mu.Lock()
			if w.firstErr == nil {
				w.firstErr = err
			}
			w.mu.Unlock()
		}
		b.finish(err)
	})
}

// PreCommit starts a new batch of records. At-least-once: the returned wait
// blocks until every record before the barrier is acknowledged (records
// after it do not delay it, unlike kgo's Flush). None: the wait returns at
// once, with the first produce error seen so far.
func (w *plainWriter) PreCommit(_ context.Context, checkpointID int64) (PreCommitted, error) {
	b := w.cur
	w.cur = newBatch(&w.stats)
	b.seal()
	return plainPreCommitted{w: w, b: b, checkpoint: checkpointID}, nil
}

type plainPreCommitted struct {
	w          *plainWriter
	b          *batch
	checkpoint int64
}

// Wait returns a nil committable: there is no transaction to commit.
func (p plainPreCommitted) Wait(ctx context.Context) (*Committable, error) {
	if !p.w.atLeast {
		p.w.mu.Lock()
		err := p.w.firstErr
		p.w.mu.Unlock()
		if err != nil {
			return nil, fmt.Errorf("checkpoint %d of task %d: produce: %w", p.checkpoint, p.w.task, err)
		}
		return nil, nil
	}
	if err := p.b.wait(ctx); err != nil {
		return nil, fmt.Errorf("flush checkpoint %d of task %d: %w", p.checkpoint, p.w.task, err)
	}
	return nil, nil
}

// Commit does nothing: records are visible as soon as they are written.
func (w *plainWriter) Commit(context.Context, []Committable) error { return nil }

// Close closes the client; unacknowledged records may be lost.
func (w *plainWriter) Close() {
	w.stop()
	w.client.Close()
}

// Stats returns the writer's counters.
func (w *plainWriter) Stats() WriterStats { return w.stats.Stats() }
