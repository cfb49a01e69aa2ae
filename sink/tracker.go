package sink

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/twmb/franz-go/pkg/kgo"
)

// WriterStats are simple counters of a writer, for metrics.
type WriterStats struct {
	// RecordsWritten counts records handed to Write (progress markers
	// excluded).
	RecordsWritten int64
	// ProduceErrors counts records whose produce failed.
	ProduceErrors int64
	// TransactionsCommitted counts transactions this writer committed
	// (exactly-once only).
	TransactionsCommitted int64
}

// StatsReporter is implemented by every Writer of this package: a metrics
// layer can type-assert a Writer to it.
type StatsReporter interface {
	// Stats returns the writer's counters so far.
	Stats() WriterStats
}

// counters backs StatsReporter.
type counters struct {
	records   atomic.Int64
	errors    atomic.Int64
	committed atomic.Int64
}

func (c *counters) Stats() WriterStats {
	return WriterStats{
		RecordsWritten:        c.records.Load(),
		ProduceErrors:         c.errors.Load(),
		TransactionsCommitted: c.committed.Load(),
	}
}

// batch tracks the records produced between two barriers: how many promises
// are still outstanding and the first produce error. kgo's Flush is not
// enough on its own: a record that fails before it is buffered has its
// promise called asynchronously without counting as buffered, so Flush can
// return before that failure is known.
type batch struct {
	mu     sync.Mutex
	n      int64
	sealed bool
	done   chan struct{} // closed when sealed and every promise ran
	failed chan struct{} // closed at the first error
	err    error
	stats  *counters
	// promise is allocated once per batch, not once per record.
	promise func(*kgo.Record, error)
}

func newBatch(stats *counters) *batch {
	b := &batch{done: make(chan struct{}), failed: make(chan struct{}), stats: stats}
	b.promise = func(_ *kgo.Record, err error) { b.finish(err) }
	return b
}

// newTxnBatch is a batch of one transaction, which began as producer id/
// epoch: a record acknowledged under another id or epoch fails the batch.
// kgo re-initialises a transactional producer by itself after some produce
// errors (KIP-360); that aborts what the transaction wrote so far, and the
// records that follow would be committed without them.
func newTxnBatch(stats *counters, id int64, epoch int16) *batch {
	b := &batch{done: make(chan struct{}), failed: make(chan struct{}), stats: stats}
	b.promise = func(r *kgo.Record, err error) {
		if err == nil {
			err = checkEpoch(r, id, epoch)
		}
		b.finish(err)
	}
	return b
}

// checkEpoch fails a record acknowledged by another producer id or epoch
// than its transaction's.
func checkEpoch(r *kgo.Record, id int64, epoch int16) error {
	if r.ProducerID == id && r.ProducerEpoch == epoch {
		return nil
	}
	return fmt.Errorf("record acknowledged as producer %d epoch %d, but its transaction began as %d/%d: the producer was re-initialised mid-transaction",
		r.ProducerID, r.ProducerEpoch, id, epoch)
}

// add counts one record about to be produced.
func (b *batch) add() {
	b.mu.Lock()
	b.n++
	b.mu.Unlock()
}

// finish is called from a produce promise.
func (b *batch) finish(err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if err != nil {
		b.stats.errors.Add(1)
		b.setErr(err)
	}
	b.n--
	if b.sealed && b.n == 0 {
		close(b.done)
	}
}

// fail records an error that did not come from a promise.
func (b *batch) fail(err error) {
	b.mu.Lock()
	b.setErr(err)
	b.mu.Unlock()
}

// setErr keeps the first error; b.mu is held.
func (b *batch) setErr(err error) {
	if b.err == nil {
		b.err = err
		close(b.failed)
	}
}

// isDone reports whether the batch is sealed and every promise ran.
func (b *batch) isDone() bool {
	select {
	case <-b.done:
		return true
	default:
		return false
	}
}

// seal says no record will be added any more.
func (b *batch) seal() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.sealed {
		return
	}
	b.sealed = true
	if b.n == 0 {
		close(b.done)
	}
}

// wait blocks until every promise of a sealed batch ran and returns the first
// produce error.
func (b *batch) wait(ctx context.Context) error {
	select {
	case <-b.done:
		return b.firstErr()
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (b *batch) firstErr() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.err
}
