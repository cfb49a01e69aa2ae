package coordinator

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/sluice-stream/sluice/internal/example"
	"github.com/sluice-stream/sluice/internal/kafkatest"
	"github.com/sluice-stream/sluice/operators"
	"github.com/sluice-stream/sluice/state"
)

// splitInput appends, for every key, n records to the partition Kafka's
// default partitioner gives the key among parts partitions (offsets
// continue after what parts already holds) and counts them in want.
func splitInput(in map[int32][]*kgo.Record, parts int32, keys []string, n int, want map[string]int64) {
	for i := range n {
		for _, k := range keys {
			p := KafkaPartition([]byte(k), parts)
			in[p] = append(in[p], &kgo.Record{Topic: "events", Partition: p, Offset: int64(len(in[p])), Key: []byte(k), Value: []byte(strconv.Itoa(i))})
			want[k]++
		}
	}
}

// savepointEnv is one fake broker and one in-memory store shared by the
// instances of a test, as a job's successive deployments share Kafka and
// checkpoint storage.
type savepointEnv struct {
	t      *testing.T
	broker *fakeBroker
	mem    *MemStorage
	logs   kafkatest.LogBuffer
}

func (e *savepointEnv) open(_ context.Context, loc string) (Storage, error) {
	return Sub(e.mem, loc), nil
}

// start runs an instance of job over input until stopped; it returns the
// instance and a function that cancels it and returns Run's result.
func (e *savepointEnv) start(job *operators.Job, input map[int32][]*kgo.Record, imp *ImportConfig) (*Instance, <-chan error, context.CancelFunc) {
	return e.startWithHook(job, input, imp, nil)
}

func (e *savepointEnv) startWithHook(job *operators.Job, input map[int32][]*kgo.Record, imp *ImportConfig, hook Hook) (*Instance, <-chan error, context.CancelFunc) {
	settings := DefaultSettings()
	settings.Interval = 5 * time.Millisecond
	tasks := make([]int32, 0, len(input))
	for p := range int32(len(input)) {
		tasks = append(tasks, p)
	}
	in := NewInstance(InstanceConfig{
		Job: job, Storage: e.mem, Sink: &fakeSink{b: e.broker, pool: settings.MaxPending + 1},
		State: state.NewMemoryFactory(), Input: newFakeInput("events", input), Tasks: tasks,
		WorkDir: e.t.TempDir(), Settings: settings, ID: "i", Import: imp, OpenLocation: e.open, Hook: hook,
		Log: slog.New(slog.NewTextHandler(&e.logs, nil)),
	})
	e.t.Cleanup(func() {
		if e.t.Failed() {
			e.t.Logf("instance log:\n%s", e.logs.String())
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- in.Run(ctx) }()
	return in, done, cancel
}

// takeSavepoint requests a savepoint from in, waits for every part and
// completes it, as the savepoint command does.
func (e *savepointEnv) takeSavepoint(in *Instance, job string, parts int32, stop bool) string {
	e.t.Helper()
	id := NewSavepointID(time.Now())
	loc := SavepointsPrefix(job) + id
	in.RequestSavepoint(SavepointRequest{Job: job, ID: id, Location: loc, Stop: stop})
	st := Sub(e.mem, loc)
	waitFor(e.t, 30*time.Second, "every savepoint part", func() bool {
		ps, err := ReadSavepointParts(context.Background(), st)
		return err == nil && len(ps) == int(parts)
	})
	if _, err := CompleteSavepoint(context.Background(), st, Savepoint{Job: job, ID: id, Partitions: parts, Stopped: stop}); err != nil {
		e.t.Fatal(err)
	}
	return loc
}

var testKeys = func() []string {
	var ks []string
	for i := range 40 {
		ks = append(ks, fmt.Sprintf("key-%02d", i))
	}
	return ks
}()

// TestStopWithSavepointAndRestoreWithMorePartitions: a job stops with a
// savepoint on its own (the instance's Run returns), then a new deployment
// with 3 instead of 2 input partitions restores from it: every key's count
// continues exactly (output 1..n once per key), and an instance started
// again with the same --from does not import twice.
func TestStopWithSavepointAndRestoreWithMorePartitions(t *testing.T) {
	e := &savepointEnv{t: t, broker: newFakeBroker(), mem: NewMemStorage()}
	want := map[string]int64{}
	input := map[int32][]*kgo.Record{0: nil, 1: nil}
	splitInput(input, 2, testKeys, 10, want)
	phase1 := len(input[0]) + len(input[1])

	in, done, cancel := e.start(example.CountJob("counts", "events", "counts"), input, nil)
	defer cancel()
	waitFor(t, 30*time.Second, "phase 1 output", func() bool { return len(e.broker.readCommitted("counts")) == phase1 })
	loc := e.takeSavepoint(in, "counts", 2, true)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("instance stopped with savepoint: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("instance did not stop after the stop-with-savepoint")
	}
	sp, err := LoadSavepoint(context.Background(), Sub(e.mem, loc))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range sp.Parts {
		if got := p.Offsets["events"]; got != int64(len(input[p.Task])) {
			t.Errorf("savepoint task %d offset %d, want %d", p.Task, got, len(input[p.Task]))
		}
	}
	// The stop checkpoint is the newest of each task and is marked.
	for task := range int32(2) {
		ids, _ := ListCheckpointIDs(context.Background(), e.mem, "counts", task)
		c, err := LoadCheckpoint(context.Background(), e.mem, "counts", task, ids[0])
		if err != nil || c.StoppedBy != sp.ID {
			t.Fatalf("task %d newest checkpoint %+v (%v): want stopped by %s", task, c, err, sp.ID)
		}
	}

	// Three partitions now; the old ones continue at their offsets.
	splitInput(input, 3, testKeys, 7, want)
	imp := &ImportConfig{From: loc, Partitions: 3}
	_, done2, cancel2 := e.start(example.CountJob("counts", "events", "counts"), input, imp)
	total := 0
	for _, n := range want {
		total += int(n)
	}
	waitFor(t, 30*time.Second, "phase 2 output", func() bool { return len(e.broker.readCommitted("counts")) >= total })
	cancel2()
	if err := <-done2; err != nil {
		t.Fatal(err)
	}
	kafkatest.CheckCounts(t, e.broker.readCommitted("counts"), want)

	// Restarted with the same --from: no second import (it would rewind
	// the offsets and emit the counts of phase 2 again).
	splitInput(input, 3, testKeys, 1, want)
	total += len(testKeys)
	_, done3, cancel3 := e.start(example.CountJob("counts", "events", "counts"), input, imp)
	waitFor(t, 30*time.Second, "phase 3 output", func() bool { return len(e.broker.readCommitted("counts")) >= total })
	cancel3()
	if err := <-done3; err != nil {
		t.Fatal(err)
	}
	out := e.broker.readCommitted("counts")
	if len(out) != total {
		t.Fatalf("%d outputs, want %d", len(out), total)
	}
	kafkatest.CheckCounts(t, out, want)
	for task := range int32(3) {
		ids, _ := ListCheckpointIDs(context.Background(), e.mem, "counts", task)
		c, _ := LoadCheckpoint(context.Background(), e.mem, "counts", task, ids[0])
		if c.RestoredFrom != loc {
			t.Errorf("task %d: newest checkpoint restored from %q, want the lineage %q", task, c.RestoredFrom, loc)
		}
	}
}

// TestStopWithSavepointSurvivesCrashes crashes every task right after the
// stop barrier's checkpoint completed (metadata created, nothing committed,
// no part written): the next incarnation commits the transaction, stays
// stopped and writes the part from the restored state; the savepoint
// completes, the instance stops, and the output is exactly-once.
func TestStopWithSavepointSurvivesCrashes(t *testing.T) {
	for _, step := range []Step{StepMetadataCreated, StepCommitted} {
		t.Run(string(step), func(t *testing.T) {
			e := &savepointEnv{t: t, broker: newFakeBroker(), mem: NewMemStorage()}
			want := map[string]int64{}
			input := map[int32][]*kgo.Record{0: nil, 1: nil}
			splitInput(input, 2, testKeys, 10, want)
			var requested atomic.Bool
			crashed := map[int32]bool{}
			var mu sync.Mutex
			hook := func(task int32, s Step, id int64) error {
				mu.Lock()
				defer mu.Unlock()
				if s == step && requested.Load() && !crashed[task] {
					crashed[task] = true
					return ErrCrash
				}
				return nil
			}
			in, done, cancel := e.startWithHook(example.CountJob("counts", "events", "counts"), input, nil, hook)
			defer cancel()
			waitFor(t, 30*time.Second, "output", func() bool { return len(e.broker.readCommitted("counts")) == len(input[0])+len(input[1]) })
			requested.Store(true)
			loc := e.takeSavepoint(in, "counts", 2, true)
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			mu.Lock()
			if len(crashed) != 2 {
				t.Fatalf("crashes injected in tasks %v, want both", crashed)
			}
			mu.Unlock()
			kafkatest.CheckCounts(t, e.broker.readCommitted("counts"), want)
			if e.broker.openCount() != 0 {
				t.Errorf("%d transactions left open", e.broker.openCount())
			}
			sp, err := LoadSavepoint(context.Background(), Sub(e.mem, loc))
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range sp.Parts {
				n := int64(0)
				if err := ScanSavepointState(context.Background(), Sub(e.mem, loc), &p, func(k, v []byte) error { n++; return nil }); err != nil {
					t.Fatal(err)
				}
				if p.Offsets["events"] != int64(len(input[p.Task])) || n == 0 {
					t.Errorf("part of task %d: offsets %v, %d entries", p.Task, p.Offsets, n)
				}
			}
		})
	}
}

// TestRestoreFromJobCheckpoints restores a job under a new name from the
// retained checkpoints of a gracefully stopped job (its own transactions
// committed through their markers).
func TestRestoreFromJobCheckpoints(t *testing.T) {
	e := &savepointEnv{t: t, broker: newFakeBroker(), mem: NewMemStorage()}
	want := map[string]int64{}
	input := map[int32][]*kgo.Record{0: nil, 1: nil}
	splitInput(input, 2, testKeys, 5, want)
	phase1 := len(input[0]) + len(input[1])
	_, done, cancel := e.start(example.CountJob("old", "events", "counts"), input, nil)
	waitFor(t, 30*time.Second, "phase 1 output", func() bool { return len(e.broker.readCommitted("counts")) == phase1 })
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	splitInput(input, 2, testKeys, 3, want)
	_, done2, cancel2 := e.start(example.CountJob("new", "events", "counts"), input, &ImportConfig{From: "old", Partitions: 2})
	waitFor(t, 30*time.Second, "phase 2 output", func() bool { return len(e.broker.readCommitted("counts")) >= phase1+3*len(testKeys) })
	cancel2()
	if err := <-done2; err != nil {
		t.Fatal(err)
	}
	kafkatest.CheckCounts(t, e.broker.readCommitted("counts"), want)
}

// TestImportRefusesNonRestoredState: a job without the savepoint's
// operator refuses to start unless state may be dropped.
func TestImportRefusesNonRestoredState(t *testing.T) {
	e := &savepointEnv{t: t, broker: newFakeBroker(), mem: NewMemStorage()}
	input := map[int32][]*kgo.Record{0: nil}
	splitInput(input, 1, testKeys, 2, map[string]int64{})
	in, done, cancel := e.start(example.CountJob("counts", "events", "counts"), input, nil)
	waitFor(t, 30*time.Second, "output", func() bool { return len(e.broker.readCommitted("counts")) == len(input[0]) })
	loc := e.takeSavepoint(in, "counts", 1, false)
	cancel()
	<-done

	renamed := func() *operators.Job {
		job := operators.NewJob("counts")
		events := operators.FromKafka(job, "events", operators.Strings)
		byKey := operators.KeyBy(events, func(m operators.Message) string { return m.Key }, state.String)
		operators.ToKafka(operators.Process(byKey, "renamed", func(ctx *operators.Context[string], m operators.Message, out func(string)) error {
			out(m.Value)
			return nil
		}), "other", func(s string) ([]byte, []byte, error) { return nil, []byte(s), nil })
		return job
	}
	task := NewTask(TaskConfig{
		Job: renamed(), Task: 0, Storage: e.mem, Sink: &fakeSink{b: e.broker, pool: 3}, State: state.NewMemoryFactory(),
		Input: newFakeInput("events", input), WorkDir: t.TempDir(), Settings: DefaultSettings(), Owner: "o1",
		Import: &ImportConfig{From: loc, Partitions: 1}, OpenLocation: e.open,
	})
	if err := task.Run(context.Background()); !errors.Is(err, ErrNonRestoredState) || !strings.Contains(err.Error(), `"count"`) {
		t.Fatalf("run without --allow-non-restored-state: %v, want ErrNonRestoredState naming operator count", err)
	}
	ctx, cancelRun := context.WithCancel(context.Background())
	task = NewTask(TaskConfig{
		Job: renamed(), Task: 0, Storage: e.mem, Sink: &fakeSink{b: e.broker, pool: 3}, State: state.NewMemoryFactory(),
		Input: newFakeInput("events", input), WorkDir: t.TempDir(), Settings: DefaultSettings(), Owner: "o2",
		Import: &ImportConfig{From: loc, Partitions: 1, AllowNonRestoredState: true}, OpenLocation: e.open,
	})
	runDone := make(chan error, 1)
	go func() { runDone <- task.Run(ctx) }()
	waitFor(t, 10*time.Second, "the task to run", func() bool { return task.st.Running.Load() })
	cancelRun()
	if err := <-runDone; err != nil {
		t.Fatalf("run with --allow-non-restored-state: %v", err)
	}
}

// TestSavepointStateFileIsVerified: a state file that does not match its
// part (a flipped byte, a truncation) is refused, and dispose removes a
// savepoint completely, metadata first.
func TestSavepointStateFileIsVerified(t *testing.T) {
	checkSavepointFormat(t, NewMemStorage())
}

// checkSavepointFormat writes, completes, reads, corrupts and disposes a
// savepoint in the empty storage root.
func checkSavepointFormat(t *testing.T, root Storage) {
	ctx := context.Background()
	st := Sub(root, "sp")
	entries := map[string]string{"a": "1", "b": "22", "c": ""}
	scan := func(fn func(k, v []byte) error) error {
		for _, k := range []string{"a", "b", "c"} {
			if err := fn([]byte(k), []byte(entries[k])); err != nil {
				return err
			}
		}
		return nil
	}
	part := SavepointPart{Job: "j", SavepointID: "sp-1", Task: 0, CheckpointID: 4, Offsets: map[string]int64{"events": 9}}
	if err := WriteSavepointPart(ctx, st, part, t.TempDir(), scan); err != nil {
		t.Fatal(err)
	}
	sp, err := CompleteSavepoint(ctx, st, Savepoint{Job: "j", ID: "sp-1", Partitions: 1})
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	if err := ScanSavepointState(ctx, st, &sp.Parts[0], func(k, v []byte) error { got[string(k)] = string(v); return nil }); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != fmt.Sprint(entries) {
		t.Fatalf("read back %v, want %v", got, entries)
	}
	rc, _ := st.Get(ctx, sp.Parts[0].State)
	orig, _ := io.ReadAll(rc)
	rc.Close()
	for name, data := range map[string][]byte{
		"flipped":   append(append([]byte(nil), orig[:len(orig)-1]...), orig[len(orig)-1]^1),
		"truncated": orig[:len(orig)-2],
		"empty":     nil,
	} {
		if err := st.Put(ctx, sp.Parts[0].State, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
		err := ScanSavepointState(ctx, st, &sp.Parts[0], func(k, v []byte) error { return nil })
		if !errors.Is(err, ErrCorruptState) {
			t.Errorf("%s state file: %v, want ErrCorruptState", name, err)
		}
	}
	if err := root.Put(ctx, "other/file", strings.NewReader("x")); err != nil {
		t.Fatal(err)
	}
	if n, err := DisposeSavepoint(ctx, st); err != nil || n != 3 {
		t.Fatalf("dispose: %d objects, %v; want 3", n, err)
	}
	if names, _ := root.List(ctx, ""); len(names) != 1 || names[0] != "other/file" {
		t.Fatalf("after dispose: %v, want only other/file", names)
	}
}
