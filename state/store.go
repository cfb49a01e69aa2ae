package state

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
)

// ErrNotOldest is returned by Store.Persist for a sealed buffer that is not
// the oldest one still waiting: applying buffers out of order would let an
// older write overwrite a newer one in the backend.
var ErrNotOldest = errors.New("state: sealed buffer is not the oldest waiting one")

// entry is one buffered write: a value or, if deleted, a tombstone that
// hides the key in older layers.
type entry struct {
	value   []byte
	deleted bool
}

// Sealed is a write buffer closed by a barrier, waiting to be persisted. It
// is immutable, so the task goroutine reads it while Persist applies it.
type Sealed struct {
	entries map[string]*entry
}

// Len returns the number of keys written in the buffer (puts and deletes).
func (s *Sealed) Len() int { return len(s.entries) }

// sealedList is an immutable list of sealed buffers, oldest first. It is
// replaced, never changed, so readers load it with one atomic operation.
type sealedList struct {
	bufs []*Sealed
}

// Store is one task's buffered view of its Backend.
//
// Get, Put, Delete, Scan and Seal belong to the task goroutine; Persist may
// run concurrently on another goroutine. The live buffer needs no lock
// because only the task goroutine touches it; the sealed list is read with
// an atomic load, so a read that misses the live buffer costs no lock
// either.
type Store struct {
	backend Backend
	live    map[string]*entry // task goroutine only

	sealed  atomic.Pointer[sealedList]
	sealMu  sync.Mutex // serializes replacements of sealed (Seal and Persist)
	persist sync.Mutex // one Persist at a time; Close waits for it
	closed  bool       // guarded by persist
}

// NewStore returns a Store over b with an empty write buffer.
func NewStore(b Backend) *Store {
	s := &Store{backend: b, live: map[string]*entry{}}
	s.sealed.Store(&sealedList{})
	return s
}

// Backend returns the backend under the store.
func (s *Store) Backend() Backend { return s.backend }

// Get returns the value of key: from the live buffer, else from the sealed
// buffers (newest first), else from the backend. A delete in a newer layer
// hides older values. The value is a copy the caller owns.
func (s *Store) Get(key []byte) ([]byte, bool, error) {
	v, ok, buffered, err := s.lookup(key)
	if err != nil {
		return nil, false, err
	}
	if ok && buffered {
		v = bytes.Clone(v)
	}
	return v, ok, nil
}

// lookup is Get without the copy of a buffered value, for the typed state
// handles that decode at once: the returned slice may be overwritten by the
// next Put of the same key. buffered reports that it came from a buffer.
func (s *Store) lookup(key []byte) (v []byte, ok, buffered bool, err error) {
	if e, found := s.live[string(key)]; found {
		return e.value, !e.deleted, true, nil
	}
	// No lock: if a sealed buffer is persisted and dropped after this load,
	// the backend already holds its writes (Persist applies before it drops).
	bufs := s.sealed.Load().bufs
	for i := len(bufs) - 1; i >= 0; i-- {
		if e, found := bufs[i].entries[string(key)]; found {
			return e.value, !e.deleted, true, nil
		}
	}
	v, ok, err = s.backend.Get(key)
	if err != nil {
		return nil, false, false, fmt.Errorf("state: get: %w", err)
	}
	return v, ok, false, nil
}

// Put writes value under key into the live buffer; key and value are
// copied. Rewriting a key already in the live buffer reuses its value's
// memory, so a hot key costs no allocation between two barriers.
func (s *Store) Put(key, value []byte) {
	if e, found := s.live[string(key)]; found {
		e.value = append(e.value[:0], value...)
		e.deleted = false
		return
	}
	s.live[string(key)] = &entry{value: bytes.Clone(value)}
}

// Delete writes a tombstone for key into the live buffer, hiding any value
// in the sealed buffers and the backend.
func (s *Store) Delete(key []byte) {
	if e, found := s.live[string(key)]; found {
		e.value = e.value[:0]
		e.deleted = true
		return
	}
	s.live[string(key)] = &entry{deleted: true}
}

// Scan calls fn for every key starting with prefix, in key order, over
// the merged view of all layers with deletes applied. fn's slices are valid
// only during the call and must not be modified; writes made by fn are not
// seen by the scan in progress. An error from fn stops the scan and is
// returned as is.
//
// Scan visits every buffered key (not only those under prefix) and sorts
// the matching ones: its cost grows with the writes since the oldest
// unpersisted barrier, which is fine for its rare uses.
func (s *Store) Scan(prefix []byte, fn func(key, value []byte) error) error {
	p := string(prefix)
	over := map[string]entry{} // newest buffered entry of each matching key
	collect := func(m map[string]*entry) {
		for k, e := range m {
			if _, seen := over[k]; !seen && strings.HasPrefix(k, p) {
				// A copy: fn may Put, which reuses live values' memory.
				over[k] = entry{value: bytes.Clone(e.value), deleted: e.deleted}
			}
		}
	}
	collect(s.live)
	bufs := s.sealed.Load().bufs
	for i := len(bufs) - 1; i >= 0; i-- {
		collect(bufs[i].entries)
	}
	keys := make([]string, 0, len(over))
	for k := range over {
		keys = append(keys, k)
	}
	slices.Sort(keys)

	i := 0 // next buffered key to merge
	emitBuffered := func(below string, all bool) error {
		for ; i < len(keys) && (all || keys[i] < below); i++ {
			if e := over[keys[i]]; !e.deleted {
				if err := fn([]byte(keys[i]), e.value); err != nil {
					return err
				}
			}
		}
		return nil
	}
	err := s.backend.Scan(prefix, func(k, v []byte) error {
		if err := emitBuffered(string(k), false); err != nil {
			return err
		}
		if i < len(keys) && keys[i] == string(k) {
			e := over[keys[i]]
			i++
			if e.deleted {
				return nil
			}
			return fn(k, e.value)
		}
		return fn(k, v)
	})
	if err != nil {
		return err
	}
	return emitBuffered("", true)
}

// Seal is the barrier: it moves the live buffer to the end of the sealed
// list and starts a fresh one. O(1) in the state size: no copy, no I/O.
func (s *Store) Seal() *Sealed {
	sealed := &Sealed{entries: s.live}
	s.live = map[string]*entry{}
	s.sealMu.Lock()
	old := s.sealed.Load().bufs
	bufs := make([]*Sealed, len(old), len(old)+1)
	copy(bufs, old)
	s.sealed.Store(&sealedList{bufs: append(bufs, sealed)})
	s.sealMu.Unlock()
	return sealed
}

// SealedCount returns the number of sealed buffers not yet persisted; the
// caller applies backpressure when it grows.
func (s *Store) SealedCount() int { return len(s.sealed.Load().bufs) }

// Persist is the checkpoint's asynchronous part: it applies sealed, which
// must be the oldest buffer still sealed (else ErrNotOldest), to the backend
// as one batch, drops it from the sealed list, then takes a backend
// checkpoint into dir and returns its file names. It may run concurrently
// with the task goroutine; Persist calls are serialized.
//
// If the apply fails, sealed stays in the list (its writes are still read
// from there). If only the checkpoint fails, the writes are in the backend
// and the next Persist's checkpoint includes them.
func (s *Store) Persist(sealed *Sealed, dir string) ([]string, error) {
	s.persist.Lock()
	defer s.persist.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	// Only Persist removes buffers and it holds s.persist: the oldest one
	// cannot change until this call drops it.
	if bufs := s.sealed.Load().bufs; len(bufs) == 0 || bufs[0] != sealed {
		return nil, ErrNotOldest
	}
	if len(sealed.entries) > 0 {
		b := Batch{ops: make([]batchOp, 0, len(sealed.entries))}
		for k, e := range sealed.entries {
			add(&b, k, e.value, e.deleted)
		}
		if err := s.backend.Apply(&b); err != nil {
			return nil, fmt.Errorf("state: persist: %w", err)
		}
	}
	s.sealMu.Lock()
	// A copy, so the dropped buffer's memory is not kept by the old array.
	s.sealed.Store(&sealedList{bufs: slices.Clone(s.sealed.Load().bufs[1:])})
	s.sealMu.Unlock()
	files, err := s.backend.Checkpoint(dir)
	if err != nil {
		return nil, fmt.Errorf("state: persist: %w", err)
	}
	return files, nil
}

// Close closes the backend, after waiting for a Persist in progress.
// Buffered writes not persisted are lost, as they would be in a crash: the
// task restores from its last checkpoint.
func (s *Store) Close() error {
	s.persist.Lock()
	defer s.persist.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	return s.backend.Close()
}
