package state

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
)

// memoryFile is the one file a memory backend's checkpoint writes.
const memoryFile = "state.mem"

// memoryMagic starts a memory snapshot; its last byte is the format version.
var memoryMagic = []byte("SLUICEM\x01")

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// MemoryFactory opens backends that keep everything in memory, for tests:
// no Pebble, no files except a checkpoint's single snapshot file.
type MemoryFactory struct{}

// NewMemoryFactory returns a MemoryFactory.
func NewMemoryFactory() *MemoryFactory { return &MemoryFactory{} }

// Open returns a memory backend, loaded from dir's snapshot file if present
// (dir being a copy of a checkpoint). An empty dir gives an empty backend
// that touches no file until a Checkpoint.
func (*MemoryFactory) Open(dir string) (Backend, error) {
	m := &memoryBackend{data: map[string][]byte{}}
	if dir == "" {
		return m, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("state: open memory backend: %w", err)
	}
	path := filepath.Join(dir, memoryFile)
	raw, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return m, nil
	}
	if err != nil {
		return nil, fmt.Errorf("state: open memory backend: %w", err)
	}
	if err := m.load(raw); err != nil {
		return nil, fmt.Errorf("state: open memory backend: snapshot %s: %w", path, err)
	}
	return m, nil
}

// Shareable is always false: a memory checkpoint is one file rewritten in
// full every time.
func (*MemoryFactory) Shareable(string) bool { return false }

type memoryBackend struct {
	mu     sync.Mutex
	data   map[string][]byte // values are never modified once stored
	sorted []string          // keys of data in order; nil after a change of the key set
	closed bool
}

func (m *memoryBackend) Get(key []byte) ([]byte, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, false, ErrClosed
	}
	v, ok := m.data[string(key)]
	if !ok {
		return nil, false, nil
	}
	return bytes.Clone(v), true, nil
}

func (m *memoryBackend) Apply(b *Batch) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	return b.Each(func(key, value []byte, deleted bool) error {
		_, had := m.data[string(key)]
		if deleted {
			delete(m.data, string(key))
		} else {
			m.data[string(key)] = bytes.Clone(value)
		}
		if had == deleted { // a new key was put or an existing one deleted
			m.sorted = nil
		}
		return nil
	})
}

// keys returns the sorted keys; m.mu must be held.
func (m *memoryBackend) keys() []string {
	if m.sorted == nil {
		m.sorted = make([]string, 0, len(m.data))
		for k := range m.data {
			m.sorted = append(m.sorted, k)
		}
		slices.Sort(m.sorted)
	}
	return m.sorted
}

// Scan copies the matching entries under the lock and calls fn without it,
// so fn may call back into the backend and a concurrent Apply does not
// change what the scan sees.
func (m *memoryBackend) Scan(prefix []byte, fn func(key, value []byte) error) error {
	type kv struct {
		key   string
		value []byte
	}
	var match []kv
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return ErrClosed
	}
	keys := m.keys()
	p := string(prefix)
	for i := sort.SearchStrings(keys, p); i < len(keys) && strings.HasPrefix(keys[i], p); i++ {
		match = append(match, kv{keys[i], m.data[keys[i]]})
	}
	m.mu.Unlock()
	for _, e := range match {
		// Copies, so a caller that keeps or modifies fn's slices against the
		// contract fails the same way in tests as with Pebble.
		if err := fn([]byte(e.key), bytes.Clone(e.value)); err != nil {
			return err
		}
	}
	return nil
}

// Checkpoint writes the snapshot file: the magic, then uvarint count, then
// per entry in key order uvarint key length, key, uvarint value length,
// value, and last the CRC-32C (Castagnoli, big-endian) of everything before.
func (m *memoryBackend) Checkpoint(dir string) ([]string, error) {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil, ErrClosed
	}
	buf := append([]byte(nil), memoryMagic...)
	keys := m.keys()
	buf = binary.AppendUvarint(buf, uint64(len(keys)))
	for _, k := range keys {
		v := m.data[k]
		buf = binary.AppendUvarint(buf, uint64(len(k)))
		buf = append(buf, k...)
		buf = binary.AppendUvarint(buf, uint64(len(v)))
		buf = append(buf, v...)
	}
	m.mu.Unlock()
	buf = binary.BigEndian.AppendUint32(buf, crc32.Checksum(buf, crcTable))
	if err := writeNewDir(dir, memoryFile, buf); err != nil {
		return nil, fmt.Errorf("state: memory checkpoint to %s: %w", dir, err)
	}
	return []string{memoryFile}, nil
}

// writeNewDir creates dir, which must not exist, with one durable file.
func writeNewDir(dir, name string, data []byte) (err error) {
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return err
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = os.RemoveAll(dir)
		}
	}()
	f, err := os.OpenFile(filepath.Join(dir, name), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		_ = f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	if err := d.Sync(); err != nil {
		_ = d.Close()
		return err
	}
	return d.Close()
}

// load parses a snapshot written by Checkpoint, checking the checksum first
// and then that every length fits and keys are strictly increasing.
func (m *memoryBackend) load(raw []byte) error {
	if len(raw) < len(memoryMagic)+4 || !bytes.Equal(raw[:len(memoryMagic)], memoryMagic) {
		return errors.New("not a memory snapshot (bad magic or version)")
	}
	body, sum := raw[:len(raw)-4], binary.BigEndian.Uint32(raw[len(raw)-4:])
	if crc32.Checksum(body, crcTable) != sum {
		return errors.New("checksum mismatch")
	}
	r := body[len(memoryMagic):]
	next := func() ([]byte, error) {
		n, w := binary.Uvarint(r)
		if w <= 0 || n > uint64(len(r)-w) {
			return nil, errors.New("truncated entry")
		}
		b := r[w : w+int(n)]
		r = r[w+int(n):]
		return b, nil
	}
	count, w := binary.Uvarint(r)
	if w <= 0 {
		return errors.New("bad entry count")
	}
	r = r[w:]
	var prev []byte
	for i := uint64(0); i < count; i++ {
		k, err := next()
		if err != nil {
			return err
		}
		v, err := next()
		if err != nil {
			return err
		}
		if i > 0 && bytes.Compare(prev, k) >= 0 {
			return errors.New("keys out of order")
		}
		prev = k
		m.data[string(k)] = bytes.Clone(v)
	}
	if len(r) != 0 {
		return errors.New("trailing bytes")
	}
	return nil
}

func (m *memoryBackend) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	m.data, m.sorted = nil, nil
	return nil
}
