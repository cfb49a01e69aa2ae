package coordinator

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/sluice-stream/sluice/state"
)

// OpenCheckpointState downloads the state files of checkpoint c into dir and
// opens them with f: the state exactly as a task that restores c sees it.
// Tasks restore this way (reusing local files, see localCache); tests and
// tools use it to inspect a checkpoint.
// The caller closes the store.
func OpenCheckpointState(ctx context.Context, st Storage, f state.Factory, c *Checkpoint, dir string) (*state.Store, error) {
	store, _, err := openCheckpointState(ctx, st, f, c, dir, nil)
	return store, err
}

// openCheckpointState is OpenCheckpointState that first looks for each
// shareable file of c in cache (nil: none), and adds the files it downloads
// to it.
func openCheckpointState(ctx context.Context, st Storage, f state.Factory, c *Checkpoint, dir string, cache *localCache) (*state.Store, restoreCounts, error) {
	var n restoreCounts
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, n, fmt.Errorf("restore checkpoint %d of task %d: %w", c.ID, c.Task, err)
	}
	for _, file := range c.Files {
		dst := filepath.Join(dir, file.Name)
		shareable := cache != nil && f.Shareable(file.Name)
		if shareable && cache.link(file, dst) {
			n.reusedFiles++
			n.reusedBytes += file.Size
			continue
		}
		if err := DownloadFile(ctx, st, FileObjectName(c.Job, c.Task, file), dst); err != nil {
			return nil, n, fmt.Errorf("restore checkpoint %d of task %d: %w", c.ID, c.Task, err)
		}
		n.downloadedFiles++
		n.downloadedBytes += file.Size
		if shareable {
			cache.add(file, dst)
		}
	}
	b, err := f.Open(dir)
	if err != nil {
		return nil, n, fmt.Errorf("restore checkpoint %d of task %d: open state: %w", c.ID, c.Task, err)
	}
	return state.NewStore(b), n, nil
}
