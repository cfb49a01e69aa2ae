package coordinator

import (
	"context"
	"errors"
	"io"
)

// ErrExists is returned by Storage.Create when the object already exists.
var ErrExists = errors.New("storage: object already exists")

// ErrNotFound is returned by Storage.Get for a missing object.
var ErrNotFound = errors.New("storage: object not found")

// Storage is where checkpoints and savepoints live: a local directory or an
// object store. Names are slash-separated paths relative to the storage root,
// such as "counts/tasks/3/chk-12/_metadata". Every method must be safe for
// concurrent use.
type Storage interface {
	// Put writes an object, replacing any previous one. A reader sees either
	// the old or the whole new object, never a part.
	Put(ctx context.Context, name string, r io.Reader) error
	// Create writes an object only if none exists under that name, atomically:
	// of two racing creates exactly one succeeds; the other gets ErrExists.
	// This is how a checkpoint completes and how a task is claimed.
	Create(ctx context.Context, name string, data []byte) error
	// Get opens an object for reading; ErrNotFound if it does not exist.
	Get(ctx context.Context, name string) (io.ReadCloser, error)
	// List returns the names of all objects whose name starts with prefix,
	// sorted.
	List(ctx context.Context, prefix string) ([]string, error)
	// Delete removes an object; deleting a missing object is not an error.
	Delete(ctx context.Context, name string) error
	// String describes the storage for logs (never with credentials).
	String() string
}
