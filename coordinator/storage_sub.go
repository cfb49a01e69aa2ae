package coordinator

import (
	"context"
	"fmt"
	"io"
	"strings"
)

// Sub returns the view of st below prefix ("a/b/"): names given to it are
// relative to the prefix, and List returns them relative too. Savepoints in
// a job's default location are read and written through such a view, the
// same way as at a location of their own.
func Sub(st Storage, prefix string) Storage {
	if prefix == "" {
		return st
	}
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	return subStorage{st: st, prefix: prefix}
}

type subStorage struct {
	st     Storage
	prefix string
}

func (s subStorage) Put(ctx context.Context, name string, r io.Reader) error {
	return s.st.Put(ctx, s.prefix+name, r)
}

func (s subStorage) Create(ctx context.Context, name string, data []byte) error {
	return s.st.Create(ctx, s.prefix+name, data)
}

func (s subStorage) Get(ctx context.Context, name string) (io.ReadCloser, error) {
	return s.st.Get(ctx, s.prefix+name)
}

func (s subStorage) List(ctx context.Context, prefix string) ([]string, error) {
	names, err := s.st.List(ctx, s.prefix+prefix)
	if err != nil {
		return nil, err
	}
	for i, n := range names {
		names[i] = strings.TrimPrefix(n, s.prefix)
	}
	return names, nil
}

func (s subStorage) Delete(ctx context.Context, name string) error {
	return s.st.Delete(ctx, s.prefix+name)
}

func (s subStorage) String() string {
	return fmt.Sprintf("%s/%s", strings.TrimSuffix(s.st.String(), "/"), strings.TrimSuffix(s.prefix, "/"))
}

// mount is the inverse of Sub: the view of st as if it were below prefix
// in a larger storage. Names outside the prefix do not exist in it.
func mount(st Storage, prefix string) Storage { return mountStorage{st: st, prefix: prefix} }

type mountStorage struct {
	st     Storage
	prefix string
}

func (m mountStorage) name(n string) (string, error) {
	rest, ok := strings.CutPrefix(n, m.prefix)
	if !ok {
		return "", fmt.Errorf("%w %q: outside %s", ErrInvalidName, n, m.prefix)
	}
	return rest, nil
}

func (m mountStorage) Put(ctx context.Context, name string, r io.Reader) error {
	n, err := m.name(name)
	if err != nil {
		return err
	}
	return m.st.Put(ctx, n, r)
}

func (m mountStorage) Create(ctx context.Context, name string, data []byte) error {
	n, err := m.name(name)
	if err != nil {
		return err
	}
	return m.st.Create(ctx, n, data)
}

func (m mountStorage) Get(ctx context.Context, name string) (io.ReadCloser, error) {
	n, err := m.name(name)
	if err != nil {
		return nil, err
	}
	return m.st.Get(ctx, n)
}

func (m mountStorage) List(ctx context.Context, prefix string) ([]string, error) {
	p, ok := strings.CutPrefix(prefix, m.prefix)
	if !ok {
		if !strings.HasPrefix(m.prefix, prefix) {
			return nil, nil
		}
		p = ""
	}
	names, err := m.st.List(ctx, p)
	if err != nil {
		return nil, err
	}
	for i, n := range names {
		names[i] = m.prefix + n
	}
	return names, nil
}

func (m mountStorage) Delete(ctx context.Context, name string) error {
	n, err := m.name(name)
	if err != nil {
		return err
	}
	return m.st.Delete(ctx, n)
}

func (m mountStorage) String() string { return m.st.String() }
