package coordinator

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
)

// MemStorage is an in-memory Storage for tests. It validates names like
// LocalStorage, so a test on MemStorage catches a name a real storage would
// refuse.
type MemStorage struct {
	mu      sync.Mutex
	objects map[string][]byte // values are never modified once stored
}

var _ Storage = (*MemStorage)(nil)

// NewMemStorage returns an empty MemStorage.
func NewMemStorage() *MemStorage {
	return &MemStorage{objects: make(map[string][]byte)}
}

// String returns "mem://".
func (m *MemStorage) String() string { return "mem://" }

// Put stores the content of r under name, replacing any previous object.
func (m *MemStorage) Put(ctx context.Context, name string, r io.Reader) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	// Read everything before publishing: readers see old or whole new.
	data, err := io.ReadAll(ctxReader{ctx, r})
	if err != nil {
		return fmt.Errorf("put %s: %w", name, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.objects[name] = data
	return nil
}

// Create stores a copy of data under name unless an object exists there.
func (m *MemStorage) Create(ctx context.Context, name string, data []byte) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.objects[name]; ok {
		return fmt.Errorf("create %s: %w", name, ErrExists)
	}
	m.objects[name] = bytes.Clone(data)
	return nil
}

// Get returns a reader of the object; ErrNotFound if there is none.
func (m *MemStorage) Get(ctx context.Context, name string) (io.ReadCloser, error) {
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	m.mu.Lock()
	data, ok := m.objects[name]
	m.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("get %s: %w", name, ErrNotFound)
	}
	return io.NopCloser(bytes.NewReader(data)), nil
}

// List returns the names starting with prefix, sorted.
func (m *MemStorage) List(ctx context.Context, prefix string) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var names []string
	for name := range m.objects {
		if strings.HasPrefix(name, prefix) {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	return names, nil
}

// Delete removes the object if it exists.
func (m *MemStorage) Delete(ctx context.Context, name string) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.objects, name)
	return nil
}

// Names returns the names of all objects, sorted: handy to assert what a
// test left in storage.
func (m *MemStorage) Names() []string {
	names, _ := m.List(context.Background(), "")
	return names
}
