package coordinator

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/sluice-stream/sluice/internal/example"
	"github.com/sluice-stream/sluice/internal/kafkatest"
	"github.com/sluice-stream/sluice/sink"
	"github.com/sluice-stream/sluice/state"
)

// protocolSteps are the named steps a fault plan aims its crashes at.
var protocolSteps = []Step{StepRecord, StepBarrier, StepPreCommitted, StepUploaded, StepMetadataCreated,
	StepTxnCommitted, StepCommitted, StepClaimed, StepRecoveryCommit, StepFenced}

// faultPlan decides, from a seed, where a run crashes tasks and where the
// broker aborts every open transaction (a broker crash). Each crash aims at
// a step drawn uniformly, so rare steps get their share.
type faultPlan struct {
	mu      sync.Mutex
	rng     *rand.Rand
	crashes int // left to inject
	aborts  int // broker aborts left to inject
	off     bool
	broker  *fakeBroker
	target  Step
	misses  int          // hook calls since the target was drawn
	seen    map[Step]int // crashes injected per step
}

func (p *faultPlan) hook(task int32, s Step, id int64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.off {
		return nil
	}
	if p.aborts > 0 && p.rng.Float64() < 0.002 {
		p.aborts--
		p.broker.abortAll()
	}
	if p.crashes == 0 {
		return nil
	}
	if p.target == "" || p.misses > 5000 {
		p.target, p.misses = protocolSteps[p.rng.IntN(len(protocolSteps))], 0
	}
	p.misses++
	prob := 0.5
	if s == StepRecord {
		prob = 0.01
	}
	if s != p.target || p.rng.Float64() >= prob {
		return nil
	}
	p.crashes--
	p.seen[s]++
	p.target = ""
	return ErrCrash
}

func (p *faultPlan) stop() {
	p.mu.Lock()
	p.off = true
	p.mu.Unlock()
}

// genInput makes n records per partition with keys that stay in their
// partition, as Kafka's key partitioning would.
func genInput(topic string, parts int32, n int) (map[int32][]*kgo.Record, map[string]int64) {
	out := map[int32][]*kgo.Record{}
	want := map[string]int64{}
	for p := range parts {
		for i := range n {
			key := kafkatest.Key(p, i)
			out[p] = append(out[p], &kgo.Record{Topic: topic, Partition: p, Offset: int64(i), Key: []byte(key), Value: []byte(strconv.Itoa(i))})
			want[key]++
		}
	}
	return out, want
}

// checkFinalState loads every task's newest checkpoint as a restore would
// and compares the counting operator's state with the true counts.
func checkFinalState(t *testing.T, st Storage, job string, parts int32, want map[string]int64) {
	t.Helper()
	ctx := context.Background()
	for p := range parts {
		ids, err := ListCheckpointIDs(ctx, st, job, p)
		if err != nil || len(ids) == 0 {
			t.Fatalf("task %d: no checkpoint (%v)", p, err)
		}
		c, err := LoadCheckpoint(ctx, st, job, p, ids[0])
		if err != nil {
			t.Fatal(err)
		}
		store, err := OpenCheckpointState(ctx, st, state.NewMemoryFactory(), c, t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		kafkatest.CheckCountState(t, store, p, want)
		store.Close()
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestProtocolUnderFaults drives the real checkpoint and takeover protocol
// against the fake broker and storage through many seeded fault plans:
// crashes at every protocol step and at random records, broker aborts of
// every open transaction (lost pre-committed transactions), storage
// failures and lost create answers. In every run the committed output holds
// every input's output exactly once, in order per key, and the final state
// equals the true counts.
func TestProtocolUnderFaults(t *testing.T) {
	runs := 60
	if testing.Short() {
		runs = 15
	}
	total := map[Step]int{}
	rollbacks := 0
	for seed := range runs {
		seen, lost := runProtocolScenario(t, uint64(seed))
		for s, n := range seen {
			total[s] += n
		}
		rollbacks += lost
	}
	t.Logf("crashes injected per step over %d runs: %v; lost transactions recovered by rollback: %d", runs, total, rollbacks)
	if rollbacks == 0 {
		t.Error("no lost transaction was ever recovered: the rollback path was not exercised")
	}
	for _, s := range protocolSteps {
		if total[s] == 0 {
			t.Errorf("no crash was injected at step %s", s)
		}
	}
}

func runProtocolScenario(t *testing.T, seed uint64) (map[Step]int, int) {
	const parts, perPart = 2, 400
	input, want := genInput("events", parts, perPart)
	broker := newFakeBroker()
	plan := &faultPlan{rng: rand.New(rand.NewPCG(seed, 7)), crashes: 12, aborts: 2, broker: broker, seen: map[Step]int{}}
	mem := NewMemStorage()
	st := NewFaultyStorage(mem)
	var stMu sync.Mutex
	storageFaults := 6
	st.SetFault(func(op Op, name string) error {
		stMu.Lock()
		defer stMu.Unlock()
		plan.mu.Lock()
		defer plan.mu.Unlock()
		if storageFaults > 0 && !plan.off && plan.rng.Float64() < 0.02 {
			storageFaults--
			return fmt.Errorf("injected storage error on %s %s", op, name)
		}
		return nil
	})
	st.SetFaultAfter(func(op Op, name string) error {
		plan.mu.Lock()
		defer plan.mu.Unlock()
		if op == OpCreate && !plan.off && plan.rng.Float64() < 0.05 {
			return fmt.Errorf("injected lost answer of create %s", name)
		}
		return nil
	})
	settings := DefaultSettings()
	settings.Interval = 2 * time.Millisecond
	settings.Retained = 2
	settings.TolerableFailures = 2
	settings.StopTimeout = 10 * time.Second
	job := example.CountJob("counts", "events", "counts")
	in := NewInstance(InstanceConfig{
		Job: job, Storage: st, Sink: &fakeSink{b: broker, pool: settings.MaxPending + 1},
		State: state.NewMemoryFactory(), Input: newFakeInput("events", input),
		Tasks: []int32{0, 1}, WorkDir: t.TempDir(), Settings: settings, ID: "i1", Hook: plan.hook,
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- in.Run(ctx) }()

	// Committed output grows to exactly the input once the faults are over.
	total := parts * perPart
	waitFor(t, 60*time.Second, fmt.Sprintf("seed %d: all output committed", seed), func() bool {
		n := len(broker.readCommitted("counts"))
		if n > total {
			t.Fatalf("seed %d: %d committed outputs for %d inputs", seed, n, total)
		}
		return n == total
	})
	plan.stop()
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("seed %d: instance: %v", seed, err)
	}
	kafkatest.CheckCounts(t, broker.readCommitted("counts"), want)
	checkFinalState(t, mem, "counts", parts, want)
	return plan.seen, broker.recoveredLost
}

// TestRetentionKeepsNoOrphans runs checkpoints with --retained 3 and checks
// that exactly 3 complete checkpoints and only the files they reference are
// left in storage.
func TestRetentionKeepsNoOrphans(t *testing.T) {
	checkRetentionKeepsNoOrphans(t, NewMemStorage())
}

// checkRetentionKeepsNoOrphans takes many incremental checkpoints (Pebble
// state, shared files) on st, which must be empty, and checks that exactly
// the 3 retained checkpoints and the files they reference are left, and
// that the checkpoints were incremental (a file shared by two of them).
func checkRetentionKeepsNoOrphans(t *testing.T, st Storage) {
	ctx := context.Background()
	input, _ := genInput("events", 1, 500)
	broker := newFakeBroker()
	settings := DefaultSettings()
	settings.Interval = time.Millisecond
	settings.Retained = 3
	dir := t.TempDir()
	pf := state.NewPebbleFactory(8 << 20)
	defer pf.Close()
	in := NewInstance(InstanceConfig{
		Job: example.CountJob("counts", "events", "counts"), Storage: st, Sink: &fakeSink{b: broker, pool: 3},
		State: pf, Input: newFakeInput("events", input), Tasks: []int32{0}, WorkDir: dir, Settings: settings, ID: "i1",
	})
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- in.Run(runCtx) }()
	waitFor(t, 60*time.Second, "output and 20 checkpoints", func() bool {
		return len(broker.readCommitted("counts")) == 500 && in.Stats()[0].CheckpointsCompleted.Load() >= 20
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	ids, err := ListCheckpointIDs(ctx, st, "counts", 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(ids) != 3 {
		t.Fatalf("%d complete checkpoints retained (%v), want 3", len(ids), ids)
	}
	referenced := map[string]int{}
	for _, id := range ids {
		referenced[MetadataName("counts", 0, id)]++
		c, err := LoadCheckpoint(ctx, st, "counts", 0, id)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range c.Files {
			referenced[FileObjectName("counts", 0, f)]++
		}
	}
	shared := 0
	for _, n := range referenced {
		if n > 1 {
			shared++
		}
	}
	if shared == 0 {
		t.Error("no file is shared by two retained checkpoints: checkpoints were not incremental")
	}
	names, err := st.List(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		if referenced[name] == 0 {
			t.Errorf("orphan object %s", name)
		}
	}
	if entries, _ := os.ReadDir(filepath.Join(dir, "task-0", "checkpoints")); len(entries) != 0 {
		t.Errorf("%d local checkpoint folders left behind", len(entries))
	}
}

var _ sink.Sink = (*fakeSink)(nil)

// TestCorruptNewestCheckpointFallsBack corrupts the newest checkpoint of a
// task: the next takeover skips it with a loud log line and restores the
// previous retained one, whose state then continues.
func TestCorruptNewestCheckpointFallsBack(t *testing.T) {
	ctx := context.Background()
	input, _ := genInput("events", 1, 300)
	mem := NewMemStorage()
	broker := newFakeBroker()
	settings := DefaultSettings()
	settings.Interval = time.Millisecond
	job := example.CountJob("counts", "events", "counts")
	run := func(log *slog.Logger, hook Hook, until func(*Instance) bool) {
		t.Helper()
		in := NewInstance(InstanceConfig{
			Job: job, Storage: mem, Sink: &fakeSink{b: broker, pool: 3}, State: state.NewMemoryFactory(),
			Input: newFakeInput("events", input), Tasks: []int32{0}, WorkDir: t.TempDir(), Settings: settings, ID: "i1",
			Log: log, Hook: hook,
		})
		rctx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- in.Run(rctx) }()
		waitFor(t, 20*time.Second, "the instance's condition", func() bool { return until(in) })
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	run(nil, nil, func(in *Instance) bool { return in.Stats()[0].RecordsIn.Load() == 300 })
	ids, err := ListCheckpointIDs(ctx, mem, "counts", 0)
	if err != nil || len(ids) < 2 {
		t.Fatalf("want at least 2 checkpoints, got %v (%v)", ids, err)
	}
	newest, previous := ids[0], ids[1]
	prev, err := LoadCheckpoint(ctx, mem, "counts", 0, previous)
	if err != nil {
		t.Fatal(err)
	}
	name := MetadataName("counts", 0, newest)
	r, err := mem.Get(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	data, _ := io.ReadAll(r)
	r.Close()
	data[len(data)/2] ^= 0xff
	if err := mem.Put(ctx, name, bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}

	var logs kafkatest.LogBuffer
	var restored atomic.Pointer[Checkpoint]
	// Right after the takeover, before any new checkpoint: what was restored?
	hook := func(task int32, s Step, id int64) error {
		if s == StepFenced && restored.Load() == nil {
			c, err := LoadCheckpoint(ctx, mem, "counts", task, id)
			if err != nil {
				t.Error(err)
				return err
			}
			restored.Store(c)
		}
		return nil
	}
	run(slog.New(slog.NewTextHandler(&logs, nil)), hook, func(*Instance) bool { return restored.Load() != nil })
	if !strings.Contains(logs.String(), "CHECKPOINT UNREADABLE") || !strings.Contains(logs.String(), fmt.Sprintf("checkpoint=%d", newest)) {
		t.Fatalf("no loud log line about the corrupt checkpoint %d:\n%s", newest, logs.String())
	}
	// The claim repeats the previous checkpoint's state and offsets.
	c := restored.Load()
	if c.Kind != KindClaim || c.ID != newest+1 || c.Offsets["events"] != prev.Offsets["events"] || len(c.Files) != len(prev.Files) || c.Files[0] != prev.Files[0] {
		t.Fatalf("restored %+v, want a claim %d with the offsets and files of checkpoint %d (%+v)", c, newest+1, previous, prev)
	}
}
