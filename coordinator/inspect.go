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
// Tasks restore this way; tests and tools use it to inspect a checkpoint.
// The caller closes the store.
func OpenCheckpointState(ctx context.Context, st Storage, f state.Factory, c *Checkpoint, dir string) (*state.Store, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("restore checkpoint %d of task %d: %w", c.ID, c.Task, err)
	}
	for _, file := range c.Files {
		if err := DownloadFile(ctx, st, FileObjectName(c.Job, c.Task, file), filepath.Join(dir, file.Name)); err != nil {
			return nil, fmt.Errorf("restore checkpoint %d of task %d: %w", c.ID, c.Task, err)
		}
	}
	b, err := f.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("restore checkpoint %d of task %d: open state: %w", c.ID, c.Task, err)
	}
	return state.NewStore(b), nil
}
