package state

import (
	"errors"
	"io/fs"
	"path/filepath"
	"slices"
	"sync"
)

// ErrClosed is returned by every operation on a closed Backend, Store or
// Factory, instead of the panic a closed Pebble database would raise.
var ErrClosed = errors.New("state: closed")

// Backend is the durable key-value store under one task's state. Safe for a
// concurrent Get/Scan and Apply: the task goroutine reads while the
// checkpoint's asynchronous part applies a sealed buffer.
//
// Only checkpoints are durable: the backend's own directory is scratch
// space, and after Close or a crash the state is restored from a checkpoint.
type Backend interface {
	// Get returns the value of key. The value is a copy the caller owns.
	Get(key []byte) (value []byte, ok bool, err error)
	// Apply writes a batch atomically: a concurrent reader or checkpoint
	// sees all of it or none of it.
	Apply(b *Batch) error
	// Checkpoint writes a consistent copy of the whole store into dir (which
	// must not exist yet) and returns the names of the files it wrote,
	// relative to dir (slash-separated), sorted. Opening a Backend
	// (Factory.Open) on a directory holding copies of exactly those files
	// restores the state.
	Checkpoint(dir string) ([]string, error)
	// Scan calls fn for every key starting with prefix, in key order. fn's
	// slices are valid only during the call and must not be modified; an
	// error from fn stops the scan and is returned as is.
	Scan(prefix []byte, fn func(key, value []byte) error) error
	// Close releases the backend. Closing twice is not an error.
	Close() error
}

// Factory opens the backends of one kind and knows which of their checkpoint
// files may be shared between checkpoints.
type Factory interface {
	// Open opens (creating dir if needed) the backend stored in dir.
	Open(dir string) (Backend, error)
	// Shareable reports whether the checkpoint file of this name is
	// immutable and uniquely named within one store (Pebble .sst / .blob),
	// so incremental checkpoints upload it once and reference it afterwards.
	// Everything else (MANIFEST, OPTIONS, CURRENT, WAL, marker files, memory
	// snapshot) is not.
	Shareable(name string) bool
}

// Batch is an ordered list of puts and deletes, applied atomically by
// Backend.Apply. All keys and values live in one buffer, so building a batch
// of n operations costs a few allocations, not n.
type Batch struct {
	buf []byte
	ops []batchOp
}

// batchOp locates one operation in Batch.buf: its key is buf[start:keyEnd]
// and its value buf[keyEnd:end], where start is the previous op's end.
type batchOp struct {
	keyEnd, end int
	deleted     bool
}

// Put adds a put of value under key; both are copied.
func (b *Batch) Put(key, value []byte) { b.add(key, value, false) }

// Delete adds a delete of key; the key is copied.
func (b *Batch) Delete(key []byte) { b.add(key, nil, true) }

// Len returns the number of operations in the batch.
func (b *Batch) Len() int { return len(b.ops) }

// Each calls fn for every operation in order (value is nil for a delete),
// so backends outside this package can apply a Batch. The slices are valid
// as long as the batch is not modified; fn must not modify them. An error
// from fn stops the iteration and is returned as is.
func (b *Batch) Each(fn func(key, value []byte, deleted bool) error) error {
	start := 0
	for _, op := range b.ops {
		key := b.buf[start:op.keyEnd:op.keyEnd]
		var value []byte
		if !op.deleted {
			value = b.buf[op.keyEnd:op.end:op.end]
		}
		if err := fn(key, value, op.deleted); err != nil {
			return err
		}
		start = op.end
	}
	return nil
}

// add is generic over the key so that Store.Persist can add the string keys
// of a sealed buffer without converting each to a []byte first.
func add[K string | []byte](b *Batch, key K, value []byte, deleted bool) {
	b.buf = append(b.buf, key...)
	keyEnd := len(b.buf)
	b.buf = append(b.buf, value...)
	b.ops = append(b.ops, batchOp{keyEnd: keyEnd, end: len(b.buf), deleted: deleted})
}

func (b *Batch) add(key, value []byte, deleted bool) { add(b, key, value, deleted) }

// useGuard lets Close wait for the calls in progress and turns later calls
// into ErrClosed, instead of pulling the store from under a reader. Unlike a
// read lock it may be entered recursively (a Scan callback calling Get)
// without deadlocking against a waiting Close.
type useGuard struct {
	mu     sync.Mutex
	idle   sync.Cond // signalled when n drops to 0 after closing
	n      int
	closed bool
}

func (g *useGuard) init() { g.idle.L = &g.mu }

func (g *useGuard) enter() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return ErrClosed
	}
	g.n++
	return nil
}

func (g *useGuard) exit() {
	g.mu.Lock()
	g.n--
	if g.n == 0 && g.closed {
		g.idle.Broadcast()
	}
	g.mu.Unlock()
}

// close marks the guard closed and waits until no call is in progress. It
// reports false if the guard was already closed.
func (g *useGuard) close() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	g.closed = true
	for g.n > 0 {
		g.idle.Wait()
	}
	return true
}

// listFiles returns the regular files under dir, relative and
// slash-separated, sorted: what a checkpoint wrote, as the coordinator will
// upload it.
func listFiles(dir string) ([]string, error) {
	var names []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return err
		}
		names = append(names, filepath.ToSlash(rel))
		return nil
	})
	if err != nil {
		return nil, err
	}
	slices.Sort(names)
	return names, nil
}
