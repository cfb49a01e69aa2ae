package coordinator

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/sluice-stream/sluice/internal/example"
	"github.com/sluice-stream/sluice/internal/kafkatest"
	"github.com/sluice-stream/sluice/source"
	"github.com/sluice-stream/sluice/state"
)

// pacedInput is a fakeInput whose feeds hand out the next batch only after
// a checkpoint completed (a token on gate), so every checkpoint has new
// state: Pebble writes new tables all along and compacts old ones away.
type pacedInput struct {
	*fakeInput
	gate chan struct{}
}

func (p *pacedInput) Open(ctx context.Context, task int32, offsets map[string]int64) (Feed, error) {
	inner, err := p.fakeInput.Open(ctx, task, offsets)
	if err != nil {
		return nil, err
	}
	f := &fakeFeed{c: make(chan source.Batch), done: make(chan struct{})}
	go func() {
		defer inner.Close(context.Background())
		for {
			var b source.Batch
			select {
			case b = <-inner.Batches():
			case <-f.done:
				return
			}
			select {
			case f.c <- b:
			case <-f.done:
				return
			}
			select {
			case <-p.gate:
			case <-f.done:
				return
			}
		}
	}()
	return f, nil
}

// cacheEnv runs one-task instances of the count job with Pebble state, one
// after the other on shared storage and broker, and records which shared
// state files each run downloaded and how many it uploaded.
type cacheEnv struct {
	t      *testing.T
	mem    *MemStorage
	st     *FaultyStorage
	broker *fakeBroker
	pf     *state.PebbleFactory
	input  []*kgo.Record

	mu      sync.Mutex
	gets    []string // shared objects downloaded by the current run
	uploads int      // shared objects uploaded by every run
}

func newCacheEnv(t *testing.T, records int) *cacheEnv {
	input, _ := genInput("events", 1, records)
	e := &cacheEnv{t: t, mem: NewMemStorage(), broker: newFakeBroker(), pf: state.NewPebbleFactory(8 << 20), input: input[0]}
	t.Cleanup(func() { e.pf.Close() })
	e.st = NewFaultyStorage(e.mem)
	e.st.SetFault(func(op Op, name string) error {
		if !strings.Contains(name, "/"+sharedDir) {
			return nil
		}
		e.mu.Lock()
		defer e.mu.Unlock()
		switch op {
		case OpGet:
			e.gets = append(e.gets, name)
		case OpPut:
			e.uploads++
		}
		return nil
	})
	return e
}

// run runs an instance on workDir over the first n input records until
// their output is committed, stops it (final checkpoint) and returns the
// shared objects it downloaded, sorted.
func (e *cacheEnv) run(workDir string, n int, log *slog.Logger) []string {
	t := e.t
	t.Helper()
	e.mu.Lock()
	e.gets = nil
	e.mu.Unlock()
	settings := DefaultSettings()
	settings.Interval = time.Millisecond
	settings.Retained = 3
	gate := make(chan struct{}, 1)
	in := NewInstance(InstanceConfig{
		Job: example.CountJob("counts", "events", "counts"), Storage: e.st, Sink: &fakeSink{b: e.broker, pool: settings.MaxPending + 1},
		State: e.pf, Input: &pacedInput{fakeInput: newFakeInput("events", map[int32][]*kgo.Record{0: e.input[:n]}), gate: gate},
		Tasks: []int32{0}, WorkDir: workDir, Settings: settings, ID: "i-" + filepath.Base(workDir), Log: log,
		Observe: func(r CheckpointRecord) {
			if r.Status == "completed" {
				select {
				case gate <- struct{}{}:
				default:
				}
			}
		},
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- in.Run(ctx) }()
	waitFor(t, 30*time.Second, fmt.Sprintf("output of %d records committed", n), func() bool {
		return len(e.broker.readCommitted("counts")) == n
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Sorted(slices.Values(e.gets))
}

// newest returns the task's newest checkpoint and the storage names of its
// shareable files, sorted.
func (e *cacheEnv) newest() (*Checkpoint, []string) {
	e.t.Helper()
	ctx := context.Background()
	ids, err := ListCheckpointIDs(ctx, e.mem, "counts", 0)
	if err != nil || len(ids) == 0 {
		e.t.Fatalf("no checkpoint (%v)", err)
	}
	c, err := LoadCheckpoint(ctx, e.mem, "counts", 0, ids[0])
	if err != nil {
		e.t.Fatal(err)
	}
	var shared []string
	for _, f := range c.Files {
		if e.pf.Shareable(f.Name) {
			shared = append(shared, FileObjectName("counts", 0, f))
		}
	}
	slices.Sort(shared)
	return c, shared
}

// checkCache checks that the cache of workDir holds only files that the
// retained checkpoints reference, with their sizes, and, if all, every
// shareable one of them.
func (e *cacheEnv) checkCache(workDir string, all bool) int {
	t := e.t
	t.Helper()
	ctx := context.Background()
	ids, err := ListCheckpointIDs(ctx, e.mem, "counts", 0)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int64{}
	for _, id := range ids {
		c, err := LoadCheckpoint(ctx, e.mem, "counts", 0, id)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range c.Files {
			if e.pf.Shareable(f.Name) {
				want[entryName(f.Object)] = f.Size
			}
		}
	}
	entries, err := os.ReadDir(filepath.Join(workDir, "task-0", localCacheDir))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, en := range entries {
		got[en.Name()] = true
		size, ok := want[en.Name()]
		if !ok {
			t.Errorf("cache of %s holds %s, which no retained checkpoint (%v) references", workDir, en.Name(), ids)
			continue
		}
		if fi, err := en.Info(); err != nil || fi.Size() != size {
			t.Errorf("cache entry %s: %v, want size %d", en.Name(), err, size)
		}
	}
	if all {
		for name := range want {
			if !got[name] {
				t.Errorf("cache of %s lacks %s, referenced by a retained checkpoint", workDir, name)
			}
		}
	}
	return len(entries)
}

// checkExact checks the committed output (each count once, in order) and
// the newest checkpoint's state against the true counts of the first n
// records.
func (e *cacheEnv) checkExact(n int) {
	t := e.t
	t.Helper()
	want := map[string]int64{}
	for _, r := range e.input[:n] {
		want[string(r.Key)]++
	}
	kafkatest.CheckCounts(t, e.broker.readCommitted("counts"), want)
	c, _ := e.newest()
	store, err := OpenCheckpointState(context.Background(), e.mem, e.pf, c, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	kafkatest.CheckCountState(t, store, 0, want)
}

// TestRestoreReusesLocalStateFiles restarts a task on the same work dir
// several times: the restore links the shareable state files its cache holds
// instead of downloading them, downloads only an entry that is missing or
// has the wrong size, keeps the cache to the files of the retained
// checkpoints, and the state stays exact. A task on another work dir
// downloads everything.
func TestRestoreReusesLocalStateFiles(t *testing.T) {
	e := newCacheEnv(t, 500)
	dir := t.TempDir()
	cacheDir := filepath.Join(dir, "task-0", localCacheDir)

	// A fresh task downloads nothing (there is nothing yet) and keeps what it
	// uploads, pruned to the retained checkpoints.
	if gets := e.run(dir, 150, nil); len(gets) != 0 {
		t.Fatalf("first run downloaded %v", gets)
	}
	e.checkExact(150)
	c, shared := e.newest()
	if len(shared) == 0 {
		t.Fatalf("checkpoint %d has no shareable file: the test proves nothing", c.ID)
	}
	e.checkCache(dir, true)

	// Restart on the same work dir: every shareable file is reused.
	var logs kafkatest.LogBuffer
	if gets := e.run(dir, 250, slog.New(slog.NewTextHandler(&logs, nil))); len(gets) != 0 {
		t.Fatalf("restart on the same work dir downloaded %v, want none of %v", gets, shared)
	}
	e.checkExact(250)
	var restoredLine string
	for line := range strings.Lines(logs.String()) {
		if strings.Contains(line, "task restored") {
			restoredLine = line
		}
	}
	var reusedBytes int64
	for _, f := range c.Files {
		if e.pf.Shareable(f.Name) {
			reusedBytes += f.Size
		}
	}
	for _, want := range []string{
		fmt.Sprintf("reused_files=%d ", len(shared)), fmt.Sprintf("reused_bytes=%d ", reusedBytes),
		fmt.Sprintf("downloaded_files=%d ", len(c.Files)-len(shared)),
	} {
		if !strings.Contains(restoredLine, want) {
			t.Errorf("restore log line lacks %q: %s", want, restoredLine)
		}
	}
	e.checkCache(dir, true)

	// An entry with the wrong size is downloaded again (and replaced).
	c, shared = e.newest()
	victim := c.Files[slices.IndexFunc(c.Files, func(f FileRef) bool { return e.pf.Shareable(f.Name) })]
	entry := filepath.Join(cacheDir, entryName(victim.Object))
	if err := os.Remove(entry); err != nil { // not a write: the entry is a link to the backend's file
		t.Fatal(err)
	}
	if err := os.WriteFile(entry, []byte("truncated"), 0o644); err != nil {
		t.Fatal(err)
	}
	if gets, want := e.run(dir, 330, nil), []string{FileObjectName("counts", 0, victim)}; !slices.Equal(gets, want) {
		t.Fatalf("with a wrong-size cache entry, downloaded %v, want %v", gets, want)
	}
	e.checkExact(330)
	e.checkCache(dir, true)

	// A missing entry is downloaded again.
	c, _ = e.newest()
	victim = c.Files[slices.IndexFunc(c.Files, func(f FileRef) bool { return e.pf.Shareable(f.Name) })]
	if err := os.Remove(filepath.Join(cacheDir, entryName(victim.Object))); err != nil {
		t.Fatal(err)
	}
	if gets, want := e.run(dir, 410, nil), []string{FileObjectName("counts", 0, victim)}; !slices.Equal(gets, want) {
		t.Fatalf("with a missing cache entry, downloaded %v, want %v", gets, want)
	}
	e.checkExact(410)
	kept := e.checkCache(dir, true)
	e.mu.Lock()
	uploads := e.uploads
	e.mu.Unlock()
	if uploads <= kept {
		t.Errorf("%d shared files uploaded, %d cached: compaction never dropped a table, pruning is untested", uploads, kept)
	}

	// Another instance (another work dir) has no cache: it downloads every
	// shareable file.
	_, shared = e.newest()
	other := t.TempDir()
	if gets := e.run(other, 500, nil); !slices.Equal(gets, shared) {
		t.Fatalf("a new work dir downloaded %v, want %v", gets, shared)
	}
	e.checkExact(500)
	e.checkCache(other, false)
}
