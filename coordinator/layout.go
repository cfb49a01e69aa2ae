package coordinator

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Storage names, all in one place:
//
//	<job>/tasks/<task>/chk-<id>/_metadata   complete exactly when this exists
//	<job>/tasks/<task>/chk-<id>/<file>      files private to one checkpoint
//	<job>/tasks/<task>/shared/<file>        files referenced by several checkpoints
//
// FileRef.Object names are relative to the task prefix.

const (
	checkpointDirPrefix = "chk-"
	metadataFile        = "_metadata"
	sharedDir           = "shared/"
)

// tmpPrefix starts the name of every temporary file LocalStorage and
// DownloadFile write. Object names may not use it, so a temporary file can
// never be mistaken for an object.
const tmpPrefix = ".sluice-tmp-"

// ErrInvalidName is returned for an object name that is not a clean relative
// slash path.
var ErrInvalidName = errors.New("storage: invalid object name")

// ValidateName checks that name is usable as an object name in every
// Storage: relative, slash-separated, with no empty, "." or ".." segment, no
// backslash or NUL, and no segment that looks like a temporary file.
func ValidateName(name string) error {
	bad := func(why string) error { return fmt.Errorf("%w %q: %s", ErrInvalidName, name, why) }
	switch {
	case name == "":
		return bad("empty")
	case strings.HasPrefix(name, "/"):
		return bad("absolute path")
	case strings.ContainsAny(name, "\\\x00"):
		return bad("contains a backslash or NUL")
	}
	for seg := range strings.SplitSeq(name, "/") {
		switch {
		case seg == "":
			return bad("empty path segment")
		case seg == "." || seg == "..":
			return bad(`"." or ".." segment`)
		case strings.HasPrefix(seg, tmpPrefix):
			return bad("segment starts with the reserved prefix " + tmpPrefix)
		}
	}
	return nil
}

// TaskPrefix is the folder of one task of a job: "<job>/tasks/<task>/".
func TaskPrefix(job string, task int32) string {
	return job + "/tasks/" + strconv.FormatInt(int64(task), 10) + "/"
}

// CheckpointPrefix is the folder of one checkpoint of a task:
// "<job>/tasks/<task>/chk-<id>/".
func CheckpointPrefix(job string, task int32, id int64) string {
	return TaskPrefix(job, task) + checkpointDir(id)
}

// MetadataName is the object whose create-if-absent completes a checkpoint:
// "<job>/tasks/<task>/chk-<id>/_metadata".
func MetadataName(job string, task int32, id int64) string {
	return CheckpointPrefix(job, task, id) + metadataFile
}

// SharedPrefix is the folder of a task's state files that several
// checkpoints may reference: "<job>/tasks/<task>/shared/".
func SharedPrefix(job string, task int32) string {
	return TaskPrefix(job, task) + sharedDir
}

// FileObjectName is the storage name of a snapshot file of a task, whose
// FileRef.Object is relative to the task prefix.
func FileObjectName(job string, task int32, f FileRef) string {
	return TaskPrefix(job, task) + f.Object
}

func checkpointDir(id int64) string {
	return checkpointDirPrefix + strconv.FormatInt(id, 10) + "/"
}

// ParseCheckpointDir returns the checkpoint id of a name relative to a task
// prefix that lies in a checkpoint folder, such as "chk-12/_metadata" or
// "chk-12/". Only the canonical spelling Sluice writes is accepted (no
// leading zeros or sign, id > 0), so a folder Sluice did not write is never
// taken for one of its checkpoints.
func ParseCheckpointDir(name string) (id int64, ok bool) {
	rest, found := strings.CutPrefix(name, checkpointDirPrefix)
	if !found {
		return 0, false
	}
	digits, _, _ := strings.Cut(rest, "/")
	id, err := strconv.ParseInt(digits, 10, 64)
	if err != nil || id <= 0 || strconv.FormatInt(id, 10) != digits {
		return 0, false
	}
	return id, true
}

// ListCheckpointIDs returns the ids of the task's checkpoints whose
// _metadata exists, newest first. Folders without metadata (a checkpoint
// being uploaded, or one that failed) are not complete and not listed.
func ListCheckpointIDs(ctx context.Context, st Storage, job string, task int32) ([]int64, error) {
	prefix := TaskPrefix(job, task)
	// Listing "chk-" rather than the whole task keeps shared/ out of it.
	names, err := st.List(ctx, prefix+checkpointDirPrefix)
	if err != nil {
		return nil, fmt.Errorf("list checkpoints of task %d: %w", task, err)
	}
	var ids []int64
	for _, name := range names {
		rel := strings.TrimPrefix(name, prefix)
		id, ok := ParseCheckpointDir(rel)
		if ok && rel == checkpointDir(id)+metadataFile {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	slices.Reverse(ids)
	return ids, nil
}

// LoadCheckpoint reads and decodes the metadata of checkpoint id of a task.
// Besides DecodeCheckpoint's checks it verifies that the metadata describes
// the checkpoint its path names, so a file copied to the wrong place is
// reported as ErrCorruptMetadata. A missing checkpoint gives ErrNotFound.
func LoadCheckpoint(ctx context.Context, st Storage, job string, task int32, id int64) (*Checkpoint, error) {
	c, err := loadCheckpoint(ctx, st, job, task, id)
	if err != nil {
		return nil, fmt.Errorf("checkpoint %d of task %d: %w", id, task, err)
	}
	return c, nil
}

func loadCheckpoint(ctx context.Context, st Storage, job string, task int32, id int64) (*Checkpoint, error) {
	name := MetadataName(job, task, id)
	rc, err := st.Get(ctx, name)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", name, err)
	}
	c, err := DecodeCheckpoint(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if c.Job != job || c.Task != task || c.ID != id {
		return nil, fmt.Errorf("%w: %s describes job %q task %d checkpoint %d",
			ErrCorruptMetadata, name, c.Job, c.Task, c.ID)
	}
	return c, nil
}

// UploadFile writes the local file localPath to storage as name, replacing
// any previous object.
func UploadFile(ctx context.Context, st Storage, name, localPath string) error {
	f, err := os.Open(localPath)
	if err != nil {
		return fmt.Errorf("upload %s: %w", localPath, err)
	}
	defer f.Close()
	if err := st.Put(ctx, name, f); err != nil {
		return fmt.Errorf("upload %s to %s: %w", localPath, name, err)
	}
	return nil
}

// DownloadFile copies object name to localPath, creating its directory if
// needed. It writes a temporary file next to localPath and renames it, so
// localPath is either absent, its previous content, or the whole object.
func DownloadFile(ctx context.Context, st Storage, name, localPath string) error {
	if err := downloadFile(ctx, st, name, localPath); err != nil {
		return fmt.Errorf("download %s to %s: %w", name, localPath, err)
	}
	return nil
}

func downloadFile(ctx context.Context, st Storage, name, localPath string) error {
	rc, err := st.Get(ctx, name)
	if err != nil {
		return err
	}
	defer rc.Close()
	tmp, err := writeTemp(ctx, filepath.Dir(localPath), rc)
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, localPath); err != nil {
		_ = os.Remove(tmp)
		return err
	}
	return nil
}
