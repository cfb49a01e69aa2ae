package coordinator

import (
	"context"
	"errors"
	"fmt"
	"strings"
)

// Retain deletes the objects of a task that none of the checkpoints in keep
// needs. Which checkpoints to keep is the caller's decision; the caller
// calls Retain only while no checkpoint of the task is in progress, since
// shared files carry no checkpoint id.
//
// Deleted: the objects of every chk-<n>/ folder with n older than the newest
// kept checkpoint and not kept (folders newer than it are left alone: they
// may be an upload in progress), and every object in shared/; except, in
// both cases, files a kept checkpoint references (a claim references the
// files of the checkpoint it repeats, which may be in that checkpoint's
// folder). Objects of the task folder outside these are not ours and stay.
//
// The metadata of dropped checkpoints goes first, so a crash half way never
// leaves a complete-looking checkpoint whose files are gone; for the same
// reason, if a metadata delete fails, that folder's other files and all of
// shared/ are left for a later call. Other failures do not stop it: the
// error joins every failed delete.
func Retain(ctx context.Context, st Storage, job string, task int32, keep []*Checkpoint) error {
	if len(keep) == 0 {
		// Keeping nothing would delete every state file: surely a bug.
		return fmt.Errorf("retain task %d: no checkpoint to keep", task)
	}
	kept := make(map[int64]bool, len(keep))
	referenced := make(map[string]bool)
	var newest int64
	for _, c := range keep {
		if c == nil || c.Job != job || c.Task != task {
			return fmt.Errorf("retain job %q task %d: a checkpoint to keep is nil or of another task", job, task)
		}
		kept[c.ID] = true
		newest = max(newest, c.ID)
		for _, f := range c.Files {
			referenced[f.Object] = true
		}
	}

	prefix := TaskPrefix(job, task)
	names, err := st.List(ctx, prefix)
	if err != nil {
		return fmt.Errorf("retain task %d: %w", task, err)
	}
	var metadata, private, shared []string
	for _, name := range names {
		rel := strings.TrimPrefix(name, prefix)
		if referenced[rel] {
			continue
		}
		if strings.HasPrefix(rel, sharedDir) {
			shared = append(shared, name)
			continue
		}
		id, ok := ParseCheckpointDir(rel)
		switch {
		case !ok || kept[id] || id >= newest:
		case rel == checkpointDir(id)+metadataFile:
			metadata = append(metadata, name)
		default:
			private = append(private, name)
		}
	}

	var errs []error
	del := func(name string) bool {
		if err := ctx.Err(); err != nil {
			return false
		}
		if err := st.Delete(ctx, name); err != nil {
			errs = append(errs, fmt.Errorf("delete %s: %w", name, err))
			return false
		}
		return true
	}
	undeleted := make(map[int64]bool) // checkpoints whose metadata remains
	for _, name := range metadata {
		if !del(name) {
			id, _ := ParseCheckpointDir(strings.TrimPrefix(name, prefix))
			undeleted[id] = true
		}
	}
	for _, name := range private {
		if id, _ := ParseCheckpointDir(strings.TrimPrefix(name, prefix)); !undeleted[id] {
			del(name)
		}
	}
	if len(undeleted) == 0 {
		for _, name := range shared {
			del(name)
		}
	}
	if err := ctx.Err(); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("retain task %d: %w", task, err)
	}
	return nil
}
