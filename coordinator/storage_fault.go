package coordinator

import (
	"context"
	"io"
	"sync"
)

// Op names a Storage operation, for fault injection.
type Op string

// The operations of Storage that FaultyStorage can fail.
const (
	OpPut    Op = "put"
	OpCreate Op = "create"
	OpGet    Op = "get"
	OpList   Op = "list"
	OpDelete Op = "delete"
)

// FaultFunc decides the fault of one operation: nil lets it through. For
// List, name is the prefix.
type FaultFunc func(op Op, name string) error

// FaultyStorage wraps a Storage to inject failures in tests, like Pebble's
// vfs error injection: errors before an operation (it never happens),
// errors after it (it happened but its answer was lost), and a stall that
// holds every operation until released or until its context ends (an
// outage, for timeout tests). It is safe for concurrent use, and faults may
// be changed while operations run.
type FaultyStorage struct {
	inner Storage

	mu      sync.Mutex
	before  FaultFunc
	after   FaultFunc
	stall   chan struct{} // non-nil while stalled; closed by Unstall
	waiting int           // operations blocked by the stall
}

var _ Storage = (*FaultyStorage)(nil)

// NewFaultyStorage wraps inner with no faults set.
func NewFaultyStorage(inner Storage) *FaultyStorage {
	return &FaultyStorage{inner: inner}
}

// SetFault sets the function called before each operation; a non-nil error
// is returned instead of performing the operation. nil clears it.
func (f *FaultyStorage) SetFault(fn FaultFunc) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.before = fn
}

// SetFaultAfter sets the function called after each operation that
// succeeded; a non-nil error is returned although the operation took
// effect, like a Create whose answer is lost. nil clears it.
func (f *FaultyStorage) SetFaultAfter(fn FaultFunc) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.after = fn
}

// Stall makes every operation that starts from now on block until Unstall
// or until its context is done, when it returns ctx.Err() without taking
// effect.
func (f *FaultyStorage) Stall() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.stall == nil {
		f.stall = make(chan struct{})
	}
}

// Unstall releases the operations blocked by Stall.
func (f *FaultyStorage) Unstall() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.stall != nil {
		close(f.stall)
		f.stall = nil
	}
}

// Waiting returns how many operations the stall is holding, so a test can
// wait until an operation is blocked before acting.
func (f *FaultyStorage) Waiting() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.waiting
}

// String describes the wrapped storage.
func (f *FaultyStorage) String() string { return "faulty(" + f.inner.String() + ")" }

// begin waits out a stall and applies the fault set before the operation.
func (f *FaultyStorage) begin(ctx context.Context, op Op, name string) error {
	f.mu.Lock()
	stall, before := f.stall, f.before
	if stall != nil {
		f.waiting++
	}
	f.mu.Unlock()
	if stall != nil {
		var err error
		select {
		case <-stall:
		case <-ctx.Done():
			err = ctx.Err()
		}
		f.mu.Lock()
		f.waiting--
		f.mu.Unlock()
		if err != nil {
			return err
		}
	}
	if before != nil {
		return before(op, name)
	}
	return nil
}

// end applies the fault set after an operation that succeeded.
func (f *FaultyStorage) end(op Op, name string) error {
	f.mu.Lock()
	after := f.after
	f.mu.Unlock()
	if after != nil {
		return after(op, name)
	}
	return nil
}

// Put writes through to the wrapped storage unless a fault says otherwise.
func (f *FaultyStorage) Put(ctx context.Context, name string, r io.Reader) error {
	if err := f.begin(ctx, OpPut, name); err != nil {
		return err
	}
	if err := f.inner.Put(ctx, name, r); err != nil {
		return err
	}
	return f.end(OpPut, name)
}

// Create creates through the wrapped storage unless a fault says otherwise.
func (f *FaultyStorage) Create(ctx context.Context, name string, data []byte) error {
	if err := f.begin(ctx, OpCreate, name); err != nil {
		return err
	}
	if err := f.inner.Create(ctx, name, data); err != nil {
		return err
	}
	return f.end(OpCreate, name)
}

// Get reads through the wrapped storage unless a fault says otherwise.
func (f *FaultyStorage) Get(ctx context.Context, name string) (io.ReadCloser, error) {
	if err := f.begin(ctx, OpGet, name); err != nil {
		return nil, err
	}
	rc, err := f.inner.Get(ctx, name)
	if err != nil {
		return nil, err
	}
	if err := f.end(OpGet, name); err != nil {
		rc.Close()
		return nil, err
	}
	return rc, nil
}

// List lists through the wrapped storage unless a fault says otherwise.
func (f *FaultyStorage) List(ctx context.Context, prefix string) ([]string, error) {
	if err := f.begin(ctx, OpList, prefix); err != nil {
		return nil, err
	}
	names, err := f.inner.List(ctx, prefix)
	if err != nil {
		return nil, err
	}
	if err := f.end(OpList, prefix); err != nil {
		return nil, err
	}
	return names, nil
}

// Delete deletes through the wrapped storage unless a fault says otherwise.
func (f *FaultyStorage) Delete(ctx context.Context, name string) error {
	if err := f.begin(ctx, OpDelete, name); err != nil {
		return err
	}
	if err := f.inner.Delete(ctx, name); err != nil {
		return err
	}
	return f.end(OpDelete, name)
}
