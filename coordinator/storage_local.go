package coordinator

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
)

// notADirectory is what opening "a/b" reports when "a" is a file: for an
// object store that simply means "b" does not exist.
const notADirectory = syscall.ENOTDIR

// maxDirRetries bounds how often a write retries after a concurrent Delete
// removed its directory.
const maxDirRetries = 100

// LocalStorage is a Storage over a local directory. Writes are durable when
// they return (file and directory fsynced) and atomic: Put renames a
// complete temporary file over the object, Create hard-links one to the
// object's name, which fails if the name exists, so an object is either
// absent or whole.
//
// Several processes may share the directory (for instance on one host, or
// a POSIX network file system that supports hard links).
type LocalStorage struct {
	root string // absolute, cleaned
}

var _ Storage = (*LocalStorage)(nil)

// NewLocalStorage opens the directory root as a Storage, creating it if
// needed. It fails early, naming the path, if the directory cannot be
// created or written, rather than at the first checkpoint.
func NewLocalStorage(root string) (*LocalStorage, error) {
	if root == "" {
		return nil, errors.New("checkpoint directory not set")
	}
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("checkpoint directory %s: %w", root, err)
	}
	if err := os.MkdirAll(abs, 0o755); err != nil {
		return nil, fmt.Errorf("checkpoint directory %s is not writable: %w", abs, err)
	}
	probe, err := os.CreateTemp(abs, tmpPrefix+"probe-*")
	if err == nil {
		err = probe.Close()
		if rmErr := os.Remove(probe.Name()); err == nil {
			err = rmErr
		}
	}
	if err != nil {
		return nil, fmt.Errorf("checkpoint directory %s is not writable: %w", abs, err)
	}
	return &LocalStorage{root: abs}, nil
}

// String returns "file://" and the absolute root directory.
func (s *LocalStorage) String() string { return "file://" + filepath.ToSlash(s.root) }

func (s *LocalStorage) path(name string) (string, error) {
	if err := ValidateName(name); err != nil {
		return "", err
	}
	return filepath.Join(s.root, filepath.FromSlash(name)), nil
}

// Put writes the object atomically: a reader sees the old or the whole new
// content.
func (s *LocalStorage) Put(ctx context.Context, name string, r io.Reader) error {
	p, err := s.path(name)
	if err != nil {
		return err
	}
	dir := filepath.Dir(p)
	tmp, err := writeTemp(ctx, dir, r)
	if err != nil {
		return fmt.Errorf("put %s: %w", name, err)
	}
	if err := os.Rename(tmp, p); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("put %s: %w", name, err)
	}
	if err := syncDir(dir); err != nil {
		return fmt.Errorf("put %s: %w", name, err)
	}
	return nil
}

// Create writes the object only if the name is free. The content is
// written and synced to a temporary file first and then hard-linked to the
// name: link fails if the name exists, so of racing creates exactly one wins
// and nobody can ever read a partly written object (unlike O_EXCL, which
// claims the name before the content is there).
func (s *LocalStorage) Create(ctx context.Context, name string, data []byte) error {
	p, err := s.path(name)
	if err != nil {
		return err
	}
	dir := filepath.Dir(p)
	tmp, err := writeTemp(ctx, dir, bytes.NewReader(data))
	if err != nil {
		return fmt.Errorf("create %s: %w", name, err)
	}
	linkErr := os.Link(tmp, p)
	// The temporary file's link keeps dir non-empty until here, so a
	// concurrent Delete cannot remove dir under the link.
	rmErr := os.Remove(tmp)
	if errors.Is(linkErr, fs.ErrExist) {
		return fmt.Errorf("create %s: %w", name, ErrExists)
	}
	if linkErr != nil {
		return fmt.Errorf("create %s: %w", name, linkErr)
	}
	// Once linked the object exists; still report a failed sync (the
	// create may not survive a crash) or cleanup, like a lost answer.
	if err := errors.Join(syncDir(dir), rmErr); err != nil {
		return fmt.Errorf("create %s (object written): %w", name, err)
	}
	return nil
}

// Get opens the object; ErrNotFound if there is none.
func (s *LocalStorage) Get(ctx context.Context, name string) (io.ReadCloser, error) {
	p, err := s.path(name)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, notADirectory) {
		return nil, fmt.Errorf("get %s: %w", name, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", name, err)
	}
	// A directory is a name prefix, not an object.
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("get %s: %w", name, err)
		}
		return nil, fmt.Errorf("get %s: %w", name, ErrNotFound)
	}
	return f, nil
}

// List returns the names of the objects starting with prefix, sorted.
// Temporary files of writes in progress are not objects and not listed.
func (s *LocalStorage) List(ctx context.Context, prefix string) ([]string, error) {
	// Walk only the deepest directory that prefix names in full, and prune
	// directories that cannot hold a match below it.
	base := ""
	if i := strings.LastIndex(prefix, "/"); i >= 0 {
		base = prefix[:i]
		if err := ValidateName(base); err != nil {
			return nil, fmt.Errorf("list %q: %w", prefix, err)
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var names []string
	err := filepath.WalkDir(filepath.Join(s.root, filepath.FromSlash(base)), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			// Objects deleted while we walk simply are not listed.
			if errors.Is(err, fs.ErrNotExist) || errors.Is(err, notADirectory) {
				return nil
			}
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		rel, err := filepath.Rel(s.root, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		if d.IsDir() {
			if rel == "." {
				return nil
			}
			if dir := rel + "/"; !strings.HasPrefix(dir, prefix) && !strings.HasPrefix(prefix, dir) {
				return fs.SkipDir
			}
			return nil
		}
		if d.Type().IsRegular() && !strings.HasPrefix(d.Name(), tmpPrefix) && strings.HasPrefix(rel, prefix) {
			names = append(names, rel)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list %q: %w", prefix, err)
	}
	// WalkDir's order is per directory ("a/b" before "a.b"); the
	// contract is plain string order.
	slices.Sort(names)
	return names, nil
}

// Delete removes the object, if it exists, and then every directory above
// it that is left empty, up to the root, so retention does not leave a trail
// of empty checkpoint folders.
func (s *LocalStorage) Delete(ctx context.Context, name string) error {
	p, err := s.path(name)
	if err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	fi, err := os.Lstat(p)
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, notADirectory) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	if fi.IsDir() {
		return nil // a name prefix, not an object
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	// Best effort: a directory another writer has just put a file (or a
	// temporary file) in is not empty and stays. A writer that loses its
	// directory between MkdirAll and creating its file retries (writeTemp).
	for dir := filepath.Dir(p); dir != s.root && strings.HasPrefix(dir, s.root); dir = filepath.Dir(dir) {
		if err := os.Remove(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
			break
		}
	}
	return nil
}

// writeTemp writes r to a new temporary file in dir, creating dir if
// needed, syncs and closes it, and returns its path. On error nothing is
// left behind.
func writeTemp(ctx context.Context, dir string, r io.Reader) (string, error) {
	f, err := createTemp(ctx, dir)
	if err != nil {
		return "", err
	}
	_, err = io.Copy(f, ctxReader{ctx, r})
	if err == nil {
		err = f.Sync()
	}
	if closeErr := f.Close(); err == nil {
		err = closeErr
	}
	if err != nil {
		_ = os.Remove(f.Name())
		return "", err
	}
	return f.Name(), nil
}

// createTemp creates a temporary file in dir. A concurrent Delete may
// remove dir or a parent (left empty) before the file is in it; then try
// again.
func createTemp(ctx context.Context, dir string) (*os.File, error) {
	var err error
	for range maxDirRetries {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		// MkdirAll too fails if a parent it just made is removed.
		if err = os.MkdirAll(dir, 0o755); err == nil {
			var f *os.File
			if f, err = os.CreateTemp(dir, tmpPrefix+"*"); err == nil {
				return f, nil
			}
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
	}
	return nil, err
}

// syncDir makes a rename or link in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if closeErr := d.Close(); err == nil {
		err = closeErr
	}
	return err
}

// ctxReader stops a long copy when its context is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
