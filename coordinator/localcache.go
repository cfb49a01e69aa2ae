package coordinator

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"sync"
)

// localCacheDir is the folder of a task's work dir that keeps its state
// files across restores.
const localCacheDir = "cache"

// localCache keeps the shareable state files (immutable, such as Pebble
// tables) that a task uploaded or downloaded, in a folder of its work dir
// that survives a restore. A takeover on the same machine then links the
// files the restored checkpoint's manifest names into the new state folder
// instead of downloading them again (DESIGN.md: "reuse local files when they
// match the manifest").
//
// Entries are keyed by FileRef.Object, which names one immutable upload,
// and are hard links to the file the backend holds (a copy where linking
// fails), so an entry costs no disk space while the backend still has the
// file. prune drops entries no retained checkpoint references, which bounds
// the cache by the retained checkpoints' state.
//
// The cache is an optimisation only: an entry that is missing or has the
// wrong size is downloaded instead, and a failure to add or remove an entry
// is logged, never fatal. The methods of a nil *localCache do nothing.
type localCache struct {
	dir string
	log *slog.Logger
	mu  sync.Mutex
}

// newLocalCache returns the cache in dir (created when first written).
func newLocalCache(dir string, log *slog.Logger) *localCache {
	return &localCache{dir: dir, log: log}
}

// entryName is the file name of object's entry: the object name escaped
// into one path segment. Object names never start with tmpPrefix
// (ValidateName), so an entry is never mistaken for a temporary file.
func entryName(object string) string { return url.PathEscape(object) }

// link hard-links the entry of ref to dst if the cache has it with ref's
// size, and reports whether it did; dst must not exist.
func (c *localCache) link(ref FileRef, dst string) bool {
	if c == nil {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	src := filepath.Join(c.dir, entryName(ref.Object))
	fi, err := os.Stat(src)
	if err != nil || !fi.Mode().IsRegular() || fi.Size() != ref.Size {
		return false
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		c.log.Warn("local state file not reused", "object", ref.Object, "err", err)
		return false
	}
	if err := linkOrCopy(src, dst); err != nil {
		c.log.Warn("local state file not reused", "object", ref.Object, "err", err)
		return false
	}
	return true
}

// add makes the local file src the entry of ref, replacing a stale one.
func (c *localCache) add(ref FileRef, src string) {
	if c == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.addLocked(ref, src); err != nil {
		c.log.Warn("state file not kept in the local cache; a restore here downloads it", "object", ref.Object, "err", err)
	}
}

func (c *localCache) addLocked(ref FileRef, src string) error {
	if err := os.MkdirAll(c.dir, 0o755); err != nil {
		return err
	}
	dst := filepath.Join(c.dir, entryName(ref.Object))
	if fi, err := os.Stat(dst); err == nil && fi.Mode().IsRegular() && fi.Size() == ref.Size {
		return nil // already there: objects are immutable
	}
	if err := os.Remove(dst); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return linkOrCopy(src, dst)
}

// prune removes every entry that no checkpoint in keep references, and any
// leftover temporary file. It returns the number of entries kept.
func (c *localCache) prune(keep []*Checkpoint) int {
	if c == nil {
		return 0
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	referenced := make(map[string]bool)
	for _, k := range keep {
		for _, f := range k.Files {
			referenced[entryName(f.Object)] = true
		}
	}
	entries, err := os.ReadDir(c.dir)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			c.log.Warn("local state cache not pruned", "dir", c.dir, "err", err)
		}
		return 0
	}
	kept := 0
	for _, e := range entries {
		if referenced[e.Name()] {
			kept++
			continue
		}
		if err := os.RemoveAll(filepath.Join(c.dir, e.Name())); err != nil {
			c.log.Warn("local state cache not pruned", "file", e.Name(), "err", err)
		}
	}
	return kept
}

// linkOrCopy makes dst (which must not exist) a hard link to src, or a copy
// where the file system cannot link (another device, no link support).
func linkOrCopy(src, dst string) error {
	if os.Link(src, dst) == nil {
		return nil
	}
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	tmp, err := writeTemp(context.Background(), filepath.Dir(dst), f)
	if err != nil {
		return fmt.Errorf("copy %s: %w", src, err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("copy %s: %w", src, err)
	}
	return nil
}

// restoreCounts says how a restore got the state files of a checkpoint:
// linked from the local cache or downloaded.
type restoreCounts struct {
	reusedFiles, downloadedFiles int
	reusedBytes, downloadedBytes int64
}

// attr returns the counts as log attributes (inlined: the group has no key).
func (n restoreCounts) attr() slog.Attr {
	return slog.Group("",
		slog.Int("reused_files", n.reusedFiles), slog.Int64("reused_bytes", n.reusedBytes),
		slog.Int("downloaded_files", n.downloadedFiles), slog.Int64("downloaded_bytes", n.downloadedBytes))
}

// clearWorkDir removes everything in a task's work dir except its local
// cache: the backend's folder and leftover checkpoint folders are scratch.
func clearWorkDir(workDir string) error {
	entries, err := os.ReadDir(workDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.Name() == localCacheDir && e.IsDir() {
			continue
		}
		if err := os.RemoveAll(filepath.Join(workDir, e.Name())); err != nil {
			return err
		}
	}
	return nil
}
