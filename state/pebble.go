package state

import (
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/cockroachdb/pebble/v2"
)

// PebbleFactory opens Pebble backends that share one block cache, so the
// memory of an instance is bounded by one setting however many tasks it
// runs.
type PebbleFactory struct {
	mu    sync.Mutex
	cache *pebble.Cache // nil once closed
}

// NewPebbleFactory returns a factory whose backends share a block cache of
// cacheBytes. Close it when the instance shuts down.
func NewPebbleFactory(cacheBytes int64) *PebbleFactory {
	return &PebbleFactory{cache: pebble.NewCache(cacheBytes)}
}

// Close releases the factory's reference to the block cache; the cache is
// freed when the last backend opened by the factory is closed too. Open
// fails with ErrClosed afterwards.
func (f *PebbleFactory) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cache != nil {
		f.cache.Unref()
		f.cache = nil
	}
	return nil
}

// Open opens the Pebble database in dir, creating it if needed.
//
// The WAL is disabled: durability comes from checkpoints only (Checkpoint
// flushes the memtable first), and a task always restores from a
// checkpoint, never from its working directory. That halves the write I/O
// of the asynchronous checkpoint part and keeps WAL data, which could not be
// shared between checkpoints, out of them (a checkpoint still lists an empty
// .log file).
func (f *PebbleFactory) Open(dir string) (Backend, error) {
	f.mu.Lock()
	cache := f.cache
	if cache != nil {
		// Hold a reference so a concurrent Close cannot free the cache
		// before pebble.Open takes its own.
		cache.Ref()
	}
	f.mu.Unlock()
	if cache == nil {
		return nil, ErrClosed
	}
	defer cache.Unref()
	db, err := pebble.Open(dir, &pebble.Options{
		Cache:              cache,
		DisableWAL:         true,
		FormatMajorVersion: pebble.FormatNewest,
		Logger:             quietLogger{},
		// Every checkpoint uploads the MANIFEST in full (it is appended
		// to, so never shareable); rolling it over early keeps that small.
		// Pebble rolls over only once the edits outweigh a fresh snapshot,
		// so this does not make it rewrite the manifest on every flush.
		MaxManifestFileSize: 256 << 10,
	})
	if err != nil {
		return nil, fmt.Errorf("state: open pebble %s: %w", dir, err)
	}
	p := &pebbleBackend{db: db, dir: dir}
	p.guard.init()
	return p, nil
}

// Shareable reports whether name is a Pebble table (NNNNNN.sst) or blob file
// (NNNNNN.blob). Pebble never rewrites such a file and never reuses its
// number within a store's lineage, including a store reopened from one of
// its checkpoints.
func (f *PebbleFactory) Shareable(name string) bool {
	num, ok := strings.CutSuffix(name, ".sst")
	if !ok {
		num, ok = strings.CutSuffix(name, ".blob")
	}
	if !ok || num == "" {
		return false
	}
	for _, c := range []byte(num) {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// quietLogger drops Pebble's informational messages (one per open, per WAL
// found...), which would flood the log of an instance with many tasks, and
// keeps its errors.
type quietLogger struct{}

func (quietLogger) Infof(string, ...any) {}

func (quietLogger) Errorf(format string, args ...any) {
	pebble.DefaultLogger.Errorf(format, args...)
}

func (quietLogger) Fatalf(format string, args ...any) {
	pebble.DefaultLogger.Fatalf(format, args...)
}

type pebbleBackend struct {
	db    *pebble.DB
	dir   string
	guard useGuard // a closed pebble.DB panics; the guard answers ErrClosed
}

func (p *pebbleBackend) Get(key []byte) ([]byte, bool, error) {
	if err := p.guard.enter(); err != nil {
		return nil, false, err
	}
	defer p.guard.exit()
	v, closer, err := p.db.Get(key)
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("state: pebble %s: get: %w", p.dir, err)
	}
	v = append(make([]byte, 0, len(v)), v...)
	if err := closer.Close(); err != nil {
		return nil, false, fmt.Errorf("state: pebble %s: get: %w", p.dir, err)
	}
	return v, true, nil
}

func (p *pebbleBackend) Apply(b *Batch) error {
	if err := p.guard.enter(); err != nil {
		return err
	}
	defer p.guard.exit()
	pb := p.db.NewBatchWithSize(len(b.buf) + 8*len(b.ops))
	defer pb.Close()
	err := b.Each(func(key, value []byte, deleted bool) error {
		if deleted {
			return pb.Delete(key, nil)
		}
		return pb.Set(key, value, nil)
	})
	if err == nil {
		// NoSync: the WAL is off, durability comes from Checkpoint.
		err = pb.Commit(pebble.NoSync)
	}
	if err != nil {
		return fmt.Errorf("state: pebble %s: apply: %w", p.dir, err)
	}
	return nil
}

// Checkpoint flushes the memtable and then takes a Pebble checkpoint (hard
// links where possible). Flushing first puts all data in .sst files, which
// later checkpoints share, and is required because the WAL is off.
func (p *pebbleBackend) Checkpoint(dir string) ([]string, error) {
	if err := p.guard.enter(); err != nil {
		return nil, err
	}
	defer p.guard.exit()
	if err := p.db.Flush(); err != nil {
		return nil, fmt.Errorf("state: pebble %s: flush: %w", p.dir, err)
	}
	if err := p.db.Checkpoint(dir); err != nil {
		return nil, fmt.Errorf("state: pebble %s: checkpoint to %s: %w", p.dir, dir, err)
	}
	names, err := listFiles(dir)
	if err != nil {
		return nil, fmt.Errorf("state: pebble %s: checkpoint to %s: %w", p.dir, dir, err)
	}
	return names, nil
}

func (p *pebbleBackend) Scan(prefix []byte, fn func(key, value []byte) error) error {
	if err := p.guard.enter(); err != nil {
		return err
	}
	defer p.guard.exit()
	// Own copies of the bounds: Pebble reads them during the whole iteration
	// and the caller may reuse its prefix buffer in fn.
	lower := append([]byte(nil), prefix...)
	it, err := p.db.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: prefixEnd(lower)})
	if err != nil {
		return fmt.Errorf("state: pebble %s: scan: %w", p.dir, err)
	}
	for ok := it.First(); ok; ok = it.Next() {
		v, err := it.ValueAndErr()
		if err != nil {
			_ = it.Close()
			return fmt.Errorf("state: pebble %s: scan: %w", p.dir, err)
		}
		if err := fn(it.Key(), v); err != nil {
			_ = it.Close()
			return err
		}
	}
	if err := it.Close(); err != nil {
		return fmt.Errorf("state: pebble %s: scan: %w", p.dir, err)
	}
	return nil
}

func (p *pebbleBackend) Close() error {
	if !p.guard.close() {
		return nil
	}
	if err := p.db.Close(); err != nil {
		return fmt.Errorf("state: pebble %s: close: %w", p.dir, err)
	}
	return nil
}

// prefixEnd returns the smallest key greater than every key starting with
// prefix, or nil (no upper bound) if there is none (prefix empty or all
// 0xff).
func prefixEnd(prefix []byte) []byte {
	for i := len(prefix) - 1; i >= 0; i-- {
		if prefix[i] != 0xff {
			end := append([]byte(nil), prefix[:i+1]...)
			end[i]++
			return end
		}
	}
	return nil
}
