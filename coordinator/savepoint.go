package coordinator

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/sluice-stream/sluice/state"
)

// A savepoint is a self-contained copy of every task of a job, taken on
// request, never deleted automatically. Unlike a checkpoint it references
// nothing outside its own location and does not depend on the state
// backend: the keyed state is stored in a portable key/value format
// (docs/savepoints.md). Layout, relative to the savepoint's location:
//
//	_metadata                    complete exactly when this exists (Savepoint)
//	tasks/<task>/_metadata       one task's part (SavepointPart)
//	tasks/<task>/state-<chk>.kv  the part's keyed state
//
// The instances write the parts, each after its checkpoint's transactions
// are committed; the savepoint command waits for every part and then
// creates _metadata.

const (
	savepointFormat  = "sluice-savepoint"
	savepointVersion = 1
	partFormat       = "sluice-savepoint-part"
	partVersion      = 1
	// stateFileMagic starts every state file of a savepoint.
	stateFileMagic = "SLUICE-STATE-1\n"
)

// SavepointRequest asks every task of a job to write its part of a
// savepoint at its next barrier; with Stop, each task then stops processing.
type SavepointRequest struct {
	Job string `json:"job"`
	ID  string `json:"id"`
	// Location is where the savepoint is written (a storage location).
	Location string `json:"location"`
	Stop     bool   `json:"stop"`
}

// Validate checks a request read from the control topic.
func (r SavepointRequest) Validate() error {
	switch {
	case r.Job == "":
		return errors.New("savepoint request: no job")
	case !savepointIDPattern.MatchString(r.ID):
		return fmt.Errorf("savepoint request: invalid id %q", r.ID)
	case r.Location == "":
		return fmt.Errorf("savepoint request %s: no location", r.ID)
	}
	return nil
}

var savepointIDPattern = regexp.MustCompile(`^sp-[0-9A-Za-z-]{1,64}$`)

// NewSavepointID returns a fresh savepoint id: "sp-<UTC time>-<random>",
// sortable by time.
func NewSavepointID(now time.Time) string {
	var b [3]byte
	_, _ = rand.Read(b[:])
	return "sp-" + now.UTC().Format("20060102-150405") + "-" + hex.EncodeToString(b[:])
}

// Savepoint is the content of a savepoint's _metadata.
type Savepoint struct {
	Job       string    `json:"job"`
	ID        string    `json:"id"`
	CreatedAt time.Time `json:"created_at"`
	// Partitions is the number of input partitions (= tasks) of the job
	// when the savepoint was taken.
	Partitions int32    `json:"partitions"`
	Inputs     []string `json:"inputs,omitempty"`
	// Stopped: the job stopped after this savepoint (stop-with-savepoint).
	Stopped bool `json:"stopped"`
	// Parts are the tasks' parts, by task.
	Parts []SavepointPart `json:"parts"`
}

// SavepointPart is one task's part of a savepoint: tasks/<task>/_metadata.
type SavepointPart struct {
	Job         string `json:"job"`
	SavepointID string `json:"savepoint_id"`
	Task        int32  `json:"task"`
	// Partitions is the job's number of tasks when the part was written
	// (0 if unknown): it tells the savepoint command how many parts to
	// wait for.
	Partitions int32 `json:"partitions"`
	// CheckpointID is the task's checkpoint whose state and offsets the part
	// copies; its transactions were committed before the part was written.
	CheckpointID int64            `json:"checkpoint_id"`
	Offsets      map[string]int64 `json:"offsets"`
	// State is the state file, relative to the savepoint's location.
	State string `json:"state"`
	// Entries, Bytes and SHA256 describe the state file; a reader checks
	// all three.
	Entries   int64     `json:"entries"`
	Bytes     int64     `json:"bytes"`
	SHA256    string    `json:"sha256"`
	CreatedAt time.Time `json:"created_at"`
}

// SavepointPartName is the metadata of a task's part, relative to the
// savepoint's location.
func SavepointPartName(task int32) string {
	return "tasks/" + strconv.FormatInt(int64(task), 10) + "/" + metadataFile
}

// savepointStateName is a part's state file; the checkpoint id keeps two
// attempts of one task (say, before and after a takeover) apart.
func savepointStateName(task int32, checkpoint int64) string {
	return fmt.Sprintf("tasks/%d/state-%d.kv", task, checkpoint)
}

// WriteSavepointPart writes one task's part of a savepoint into st (the
// savepoint's location): the state that scan yields, then the part's
// metadata, created if absent. An existing part (an earlier attempt or
// owner wrote it) is kept: it is as valid as this one.
func WriteSavepointPart(ctx context.Context, st Storage, part SavepointPart, tmpDir string, scan func(fn func(key, value []byte) error) error) error {
	name := SavepointPartName(part.Task)
	if exists, err := objectExists(ctx, st, name); err != nil || exists {
		return err
	}
	if err := os.MkdirAll(tmpDir, 0o755); err != nil {
		return fmt.Errorf("savepoint %s task %d: %w", part.SavepointID, part.Task, err)
	}
	f, err := os.CreateTemp(tmpDir, "savepoint-*.kv")
	if err != nil {
		return fmt.Errorf("savepoint %s task %d: %w", part.SavepointID, part.Task, err)
	}
	defer os.Remove(f.Name())
	defer f.Close()
	w := newStateFileWriter(f)
	if err := scan(w.add); err != nil {
		return fmt.Errorf("savepoint %s task %d: read state: %w", part.SavepointID, part.Task, err)
	}
	if err := w.finish(); err != nil {
		return fmt.Errorf("savepoint %s task %d: write state file: %w", part.SavepointID, part.Task, err)
	}
	part.State = savepointStateName(part.Task, part.CheckpointID)
	part.Entries, part.Bytes, part.SHA256 = w.entries, w.bytes, hex.EncodeToString(w.hash.Sum(nil))
	part.CreatedAt = time.Now().UTC()
	if err := UploadFile(ctx, st, part.State, f.Name()); err != nil {
		return fmt.Errorf("savepoint %s task %d: %w", part.SavepointID, part.Task, err)
	}
	data, err := encodeEnvelope(partFormat, partVersion, part)
	if err != nil {
		return fmt.Errorf("savepoint %s task %d: %w", part.SavepointID, part.Task, err)
	}
	if err := st.Create(ctx, name, data); err != nil && !errors.Is(err, ErrExists) {
		return fmt.Errorf("savepoint %s task %d: create %s: %w", part.SavepointID, part.Task, name, err)
	}
	return nil
}

func objectExists(ctx context.Context, st Storage, name string) (bool, error) {
	rc, err := st.Get(ctx, name)
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("check %s: %w", name, err)
	}
	rc.Close()
	return true, nil
}

// ReadSavepointParts returns the parts written so far into a savepoint's
// location, by task. Unreadable parts are an error.
func ReadSavepointParts(ctx context.Context, st Storage) (map[int32]*SavepointPart, error) {
	names, err := st.List(ctx, "tasks/")
	if err != nil {
		return nil, fmt.Errorf("list savepoint parts: %w", err)
	}
	parts := map[int32]*SavepointPart{}
	for _, name := range names {
		rest, ok := strings.CutPrefix(name, "tasks/")
		digits, file, _ := strings.Cut(rest, "/")
		task, err := strconv.ParseInt(digits, 10, 32)
		if !ok || err != nil || file != metadataFile || name != SavepointPartName(int32(task)) {
			continue
		}
		var p SavepointPart
		if err := readEnvelope(ctx, st, name, partFormat, partVersion, &p); err != nil {
			return nil, err
		}
		if p.Task != int32(task) {
			return nil, fmt.Errorf("%s: %w: describes task %d", name, ErrCorruptMetadata, p.Task)
		}
		parts[p.Task] = &p
	}
	return parts, nil
}

func readEnvelope(ctx context.Context, st Storage, name, format string, version int, v any) error {
	rc, err := st.Get(ctx, name)
	if err != nil {
		return fmt.Errorf("read %s: %w", name, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		return fmt.Errorf("read %s: %w", name, err)
	}
	if err := decodeEnvelope(b, format, version, v); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

// CompleteSavepoint creates a savepoint's _metadata from its parts, which
// must cover tasks 0 to partitions-1. Until then the savepoint does not
// exist for restore or listing.
func CompleteSavepoint(ctx context.Context, st Storage, sp Savepoint) (*Savepoint, error) {
	parts, err := ReadSavepointParts(ctx, st)
	if err != nil {
		return nil, fmt.Errorf("savepoint %s: %w", sp.ID, err)
	}
	sp.Parts = sp.Parts[:0]
	for task := range sp.Partitions {
		p := parts[task]
		if p == nil {
			return nil, fmt.Errorf("savepoint %s: task %d has not written its part", sp.ID, task)
		}
		if p.SavepointID != sp.ID || p.Job != sp.Job {
			return nil, fmt.Errorf("savepoint %s: part of task %d belongs to savepoint %s of job %s", sp.ID, task, p.SavepointID, p.Job)
		}
		sp.Parts = append(sp.Parts, *p)
	}
	sp.CreatedAt = time.Now().UTC()
	data, err := encodeEnvelope(savepointFormat, savepointVersion, sp)
	if err != nil {
		return nil, fmt.Errorf("savepoint %s: %w", sp.ID, err)
	}
	if err := st.Create(ctx, metadataFile, data); err != nil {
		return nil, fmt.Errorf("savepoint %s: create _metadata: %w", sp.ID, err)
	}
	return &sp, nil
}

// LoadSavepoint reads a savepoint's _metadata. ErrNotFound means the
// location holds no complete savepoint.
func LoadSavepoint(ctx context.Context, st Storage) (*Savepoint, error) {
	var sp Savepoint
	if err := readEnvelope(ctx, st, metadataFile, savepointFormat, savepointVersion, &sp); err != nil {
		return nil, fmt.Errorf("savepoint at %s: %w", st, err)
	}
	if sp.Partitions <= 0 || len(sp.Parts) != int(sp.Partitions) {
		return nil, fmt.Errorf("savepoint at %s: %w: %d parts for %d partitions", st, ErrCorruptMetadata, len(sp.Parts), sp.Partitions)
	}
	for i, p := range sp.Parts {
		if p.Task != int32(i) {
			return nil, fmt.Errorf("savepoint at %s: %w: part %d describes task %d", st, ErrCorruptMetadata, i, p.Task)
		}
		if err := ValidateName(p.State); err != nil {
			return nil, fmt.Errorf("savepoint at %s: %w: task %d: %v", st, ErrCorruptMetadata, i, err)
		}
	}
	return &sp, nil
}

// ScanSavepointState reads the state file of a part, verifying its size,
// entry count and checksum; fn sees every entry in key order. An entry
// yielded before a verification failure at the end must be discarded by
// the caller (the import does, by failing).
func ScanSavepointState(ctx context.Context, st Storage, p *SavepointPart, fn func(key, value []byte) error) error {
	rc, err := st.Get(ctx, p.State)
	if err != nil {
		return fmt.Errorf("savepoint %s task %d: %w", p.SavepointID, p.Task, err)
	}
	defer rc.Close()
	if err := readStateFile(rc, p, fn); err != nil {
		return fmt.Errorf("savepoint %s task %d: state file %s: %w", p.SavepointID, p.Task, p.State, err)
	}
	return nil
}

// ErrCorruptState is returned for a savepoint state file that does not
// match its part's description.
var ErrCorruptState = errors.New("corrupt savepoint state file")

// stateFileWriter writes the portable state format: the magic line, then
// per entry the key and the value, each as a uvarint length and the bytes.
type stateFileWriter struct {
	w       *bufio.Writer
	hash    hash.Hash
	entries int64
	bytes   int64
	buf     []byte
	err     error
}

func newStateFileWriter(f io.Writer) *stateFileWriter {
	h := sha256.New()
	w := &stateFileWriter{w: bufio.NewWriterSize(io.MultiWriter(f, h), 256<<10), hash: h}
	w.write([]byte(stateFileMagic))
	return w
}

func (w *stateFileWriter) write(b []byte) {
	if w.err == nil {
		_, w.err = w.w.Write(b)
		w.bytes += int64(len(b))
	}
}

func (w *stateFileWriter) add(key, value []byte) error {
	w.buf = binary.AppendUvarint(w.buf[:0], uint64(len(key)))
	w.buf = append(w.buf, key...)
	w.buf = binary.AppendUvarint(w.buf, uint64(len(value)))
	w.buf = append(w.buf, value...)
	w.write(w.buf)
	w.entries++
	return w.err
}

func (w *stateFileWriter) finish() error {
	if w.err == nil {
		w.err = w.w.Flush()
	}
	return w.err
}

func readStateFile(r io.Reader, p *SavepointPart, fn func(key, value []byte) error) error {
	h := sha256.New()
	counted := &countingReader{r: io.TeeReader(r, h)}
	br := bufio.NewReaderSize(counted, 256<<10)
	magic := make([]byte, len(stateFileMagic))
	if _, err := io.ReadFull(br, magic); err != nil || string(magic) != stateFileMagic {
		return fmt.Errorf("%w: not a Sluice state file", ErrCorruptState)
	}
	var n int64
	var key, value []byte
	field := func(dst []byte) ([]byte, error) {
		l, err := binary.ReadUvarint(br)
		if err != nil {
			return nil, err
		}
		if l > 1<<30 {
			return nil, fmt.Errorf("%w: entry of %d bytes", ErrCorruptState, l)
		}
		dst = slices.Grow(dst[:0], int(l))[:l]
		_, err = io.ReadFull(br, dst)
		return dst, err
	}
	for {
		if _, err := br.Peek(1); err == io.EOF {
			break
		}
		var err error
		if key, err = field(key); err != nil {
			return fmt.Errorf("%w: entry %d: key: %v", ErrCorruptState, n, err)
		}
		if value, err = field(value); err != nil {
			return fmt.Errorf("%w: entry %d: value: %v", ErrCorruptState, n, err)
		}
		n++
		if err := fn(key, value); err != nil {
			return err
		}
	}
	switch {
	case n != p.Entries:
		return fmt.Errorf("%w: %d entries, metadata says %d", ErrCorruptState, n, p.Entries)
	case counted.n != p.Bytes:
		return fmt.Errorf("%w: %d bytes, metadata says %d", ErrCorruptState, counted.n, p.Bytes)
	case hex.EncodeToString(h.Sum(nil)) != p.SHA256:
		return fmt.Errorf("%w: checksum mismatch", ErrCorruptState)
	}
	return nil
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// SavepointsPrefix is where a job's savepoints go by default, relative to
// the checkpoint storage: "<job>/savepoints/".
func SavepointsPrefix(job string) string { return job + "/savepoints/" }

// SavepointInfo is one entry of ListSavepoints.
type SavepointInfo struct {
	ID string
	// Savepoint is nil for an incomplete savepoint (no _metadata: in
	// progress, or its command failed).
	Savepoint *Savepoint
	Objects   int
	Bytes     int64
	Err       error // the metadata exists but cannot be read
}

// ListSavepoints lists the savepoints in the default location of a job,
// oldest first, complete or not.
func ListSavepoints(ctx context.Context, st Storage, job string) ([]SavepointInfo, error) {
	prefix := SavepointsPrefix(job)
	names, err := st.List(ctx, prefix)
	if err != nil {
		return nil, fmt.Errorf("list savepoints of job %s: %w", job, err)
	}
	byID := map[string]*SavepointInfo{}
	var ids []string
	for _, name := range names {
		id, rest, ok := strings.Cut(strings.TrimPrefix(name, prefix), "/")
		if !ok {
			continue
		}
		info := byID[id]
		if info == nil {
			info = &SavepointInfo{ID: id}
			byID[id] = info
			ids = append(ids, id)
		}
		info.Objects++
		if rest == metadataFile {
			info.Savepoint, info.Err = LoadSavepoint(ctx, Sub(st, prefix+id+"/"))
		}
	}
	slices.Sort(ids)
	out := make([]SavepointInfo, 0, len(ids))
	for _, id := range ids {
		info := byID[id]
		if info.Savepoint != nil {
			for _, p := range info.Savepoint.Parts {
				info.Bytes += p.Bytes
			}
		}
		out = append(out, *info)
	}
	return out, nil
}

// DisposeSavepoint deletes every object of the savepoint at st, the
// _metadata first, so an interrupted dispose never leaves a savepoint that
// looks complete with files missing.
func DisposeSavepoint(ctx context.Context, st Storage) (int, error) {
	if _, err := LoadSavepoint(ctx, st); err != nil && !errors.Is(err, ErrNotFound) {
		// Refuse to delete what is not recognisably a savepoint.
		if errors.Is(err, ErrCorruptMetadata) || errors.Is(err, ErrUnsupportedVersion) {
			return 0, fmt.Errorf("dispose: %w (delete it by hand if it really is a savepoint)", err)
		}
		return 0, fmt.Errorf("dispose: %w", err)
	}
	names, err := st.List(ctx, "")
	if err != nil {
		return 0, fmt.Errorf("dispose savepoint at %s: %w", st, err)
	}
	for _, name := range names {
		if name != metadataFile && !strings.HasPrefix(name, "tasks/") {
			return 0, fmt.Errorf("dispose savepoint at %s: %q is not part of a savepoint; refusing to delete anything", st, name)
		}
	}
	if slices.Contains(names, metadataFile) {
		if err := st.Delete(ctx, metadataFile); err != nil {
			return 0, fmt.Errorf("dispose savepoint at %s: %w", st, err)
		}
	}
	n := 0
	for _, name := range names {
		if name == metadataFile {
			n++
			continue
		}
		if err := st.Delete(ctx, name); err != nil {
			return n, fmt.Errorf("dispose savepoint at %s: %w", st, err)
		}
		n++
	}
	return n, nil
}

// partTmpDir is where a task writes a savepoint state file before upload.
func partTmpDir(workDir string) string { return filepath.Join(workDir, "savepoint") }

// scanStore adapts a store to WriteSavepointPart's scan.
func scanStore(s *state.Store) func(fn func(key, value []byte) error) error {
	return func(fn func(key, value []byte) error) error { return s.Scan(nil, fn) }
}
