package operators_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/sluice-stream/sluice/operators"
	"github.com/sluice-stream/sluice/sink"
	"github.com/sluice-stream/sluice/state"
)

// recorder is a sink.Writer that keeps what the chain writes.
type recorder struct {
	recs []*kgo.Record
}

func (w *recorder) Write(r *kgo.Record) { w.recs = append(w.recs, r) }

func (w *recorder) PreCommit(context.Context, int64) (sink.PreCommitted, error) {
	return noTxn{}, nil
}

func (w *recorder) Commit(context.Context, []sink.Committable) error { return nil }

func (w *recorder) Close() {}

// lines renders the records as "topic key=value" for comparisons.
func (w *recorder) lines() []string {
	var out []string
	for _, r := range w.recs {
		out = append(out, fmt.Sprintf("%s %s=%s", r.Topic, r.Key, r.Value))
	}
	return out
}

type noTxn struct{}

func (noTxn) Wait(context.Context) (*sink.Committable, error) { return nil, nil }

func rec(topic string, partition int32, offset int64, key, value string) *kgo.Record {
	return &kgo.Record{Topic: topic, Partition: partition, Offset: offset, Key: []byte(key), Value: []byte(value)}
}

func stringKV(m operators.Message) ([]byte, []byte, error) {
	return []byte(m.Key), []byte(m.Value), nil
}

func build(t testing.TB, j *operators.Job, env operators.TaskEnv) operators.Chain {
	t.Helper()
	chain, err := j.Build(env)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	return chain
}

func run(t testing.TB, chain operators.Chain, recs ...*kgo.Record) {
	t.Helper()
	for _, r := range recs {
		if err := chain(r); err != nil {
			t.Fatalf("chain(%s@%d): %v", r.Topic, r.Offset, err)
		}
	}
}

func TestStatelessChainAndFanOut(t *testing.T) {
	j := operators.NewJob("stateless")
	in := operators.FromKafka(j, "in", operators.Strings)
	upper := operators.Map(in, func(m operators.Message) operators.Message {
		m.Value = strings.ToUpper(m.Value)
		return m
	})
	long := operators.Filter(upper, func(m operators.Message) bool { return len(m.Value) > 1 })
	words := operators.FlatMap(long, func(m operators.Message, emit func(operators.Message)) {
		for w := range strings.FieldsSeq(m.Value) {
			emit(operators.Message{Key: m.Key, Value: w})
		}
	})
	// Fan-out: the same stream feeds two sinks, in order of definition.
	operators.ToKafka(words, "words", stringKV)
	operators.ToKafka(words, "copy", stringKV)

	w := &recorder{}
	chain := build(t, j, operators.TaskEnv{Out: w})
	run(t, chain, rec("in", 0, 0, "a", "x"), rec("in", 0, 1, "b", "hello big world"), rec("in", 0, 2, "c", "yo"))

	want := []string{
		"words b=HELLO", "copy b=HELLO", "words b=BIG", "copy b=BIG", "words b=WORLD", "copy b=WORLD",
		"words c=YO", "copy c=YO",
	}
	if got := w.lines(); !slices.Equal(got, want) {
		t.Fatalf("output\n got %q\nwant %q", got, want)
	}
}

func TestMapErrAndFailPolicy(t *testing.T) {
	j := operators.NewJob("maperr")
	if j.Name() != "maperr" {
		t.Fatalf("Name() = %q", j.Name())
	}
	j.OnDeserializeError(operators.DeadLetter("dlq"))
	j.OnDeserializeError(operators.Fail()) // back to the default
	in := operators.FromKafka(j, "in", operators.JSON[int]())
	n := operators.MapErr(in, func(v int) (int, error) {
		if v < 0 {
			return 0, fmt.Errorf("negative %d", v)
		}
		return v * 2, nil
	})
	enc := func(v int) ([]byte, []byte, error) { return nil, strconv.AppendInt(nil, int64(v), 10), nil }
	operators.ToKafka(n, "a", enc)
	operators.ToKafka(n, "b", enc)
	if got := j.Outputs(); !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("Outputs() = %q", got)
	}
	w := &recorder{}
	chain := build(t, j, operators.TaskEnv{Out: w})
	run(t, chain, rec("in", 0, 0, "", "21"))
	if err := chain(rec("in", 0, 1, "", "-1")); err == nil || !strings.Contains(err.Error(), "negative -1") {
		t.Fatalf("MapErr error = %v", err)
	}
	if err := chain(rec("in", 0, 2, "", "x")); err == nil || !strings.Contains(err.Error(), "deserialize") {
		t.Fatalf("after Fail(), bad input error = %v", err)
	}
	if got, want := w.lines(), []string{"a =42", "b =42"}; !slices.Equal(got, want) {
		t.Fatalf("output %q, want %q", got, want)
	}
}

func TestMergeCoPartitionedSources(t *testing.T) {
	j := operators.NewJob("merge")
	clicks := operators.FromKafka(j, "clicks", operators.Strings)
	views := operators.FromKafka(j, "views", operators.Raw)
	both := operators.Merge(
		operators.Map(clicks, func(m operators.Message) string { return "click:" + m.Key }),
		operators.Map(views, func(r *kgo.Record) string { return "view:" + string(r.Key) }),
	)
	operators.ToKafka(both, "out", func(s string) ([]byte, []byte, error) { return nil, []byte(s), nil })
	// A second source of an input topic sees every record too.
	operators.ToKafka(operators.FromKafka(j, "clicks", operators.Raw), "raw", func(r *kgo.Record) ([]byte, []byte, error) {
		return r.Key, r.Value, nil
	})

	if got, want := j.Inputs(), []string{"clicks", "views"}; !slices.Equal(got, want) {
		t.Errorf("Inputs() = %q, want %q", got, want)
	}
	if got, want := j.Outputs(), []string{"out", "raw"}; !slices.Equal(got, want) {
		t.Errorf("Outputs() = %q, want %q", got, want)
	}
	w := &recorder{}
	chain := build(t, j, operators.TaskEnv{Out: w})
	run(t, chain, rec("clicks", 3, 0, "u1", "c"), rec("views", 3, 0, "u2", "v"))
	want := []string{"out =click:u1", "raw u1=c", "out =view:u2"}
	if got := w.lines(); !slices.Equal(got, want) {
		t.Fatalf("output\n got %q\nwant %q", got, want)
	}
}

// countJob is the running count per record key, the example job of the
// package documentation.
func countJob(uid string) *operators.Job {
	j := operators.NewJob("counts")
	events := operators.FromKafka(j, "events", operators.Strings)
	count := state.NewValueState[int64]("count", state.Int64)
	byUser := operators.KeyBy(events, func(m operators.Message) string { return m.Key }, state.String)
	counts := operators.Process(byUser, uid, func(ctx *operators.Context[string], _ operators.Message, out func(userCount)) error {
		n, _, err := count.Get(ctx.State())
		if err != nil {
			return err
		}
		n++
		if err := count.Set(ctx.State(), n); err != nil {
			return err
		}
		out(userCount{user: ctx.Key(), n: n})
		return nil
	})
	operators.ToKafka(counts, "counts", func(c userCount) ([]byte, []byte, error) {
		return []byte(c.user), strconv.AppendInt(nil, c.n, 10), nil
	})
	return j
}

type userCount struct {
	user string
	n    int64
}

func newStore(t testing.TB) *state.Store {
	t.Helper()
	backend, err := state.NewMemoryFactory().Open(t.TempDir())
	if err != nil {
		t.Fatalf("open memory backend: %v", err)
	}
	return state.NewStore(backend)
}

// lastCounts returns the last value written per key.
func lastCounts(w *recorder) map[string]string {
	m := map[string]string{}
	for _, r := range w.recs {
		m[string(r.Key)] = string(r.Value)
	}
	return m
}

func TestKeyedCountSurvivesRebuild(t *testing.T) {
	j := countJob("count-per-user")
	if got, want := j.Operators(), []string{"count-per-user"}; !slices.Equal(got, want) {
		t.Errorf("Operators() = %q, want %q", got, want)
	}
	store := newStore(t)
	w := &recorder{}
	chain := build(t, j, operators.TaskEnv{Task: 0, Store: store, Out: w})
	var off int64
	feed := func(chain operators.Chain, keys ...string) {
		for _, k := range keys {
			run(t, chain, rec("events", 0, off, k, "e"))
			off++
		}
	}
	feed(chain, "alice", "bob", "alice", "carol", "alice", "bob")
	want := map[string]string{"alice": "3", "bob": "2", "carol": "1"}
	if got := lastCounts(w); !mapsEqual(got, want) {
		t.Fatalf("counts = %v, want %v", got, want)
	}
	if got := w.lines()[:3]; !slices.Equal(got, []string{"counts alice=1", "counts bob=1", "counts alice=2"}) {
		t.Fatalf("first outputs = %q", got)
	}

	// A new chain on the same store (what the runtime does after a restore)
	// continues from the stored counts.
	chain = build(t, j, operators.TaskEnv{Task: 0, Store: store, Out: w})
	feed(chain, "carol", "bob")
	want = map[string]string{"alice": "3", "bob": "3", "carol": "2"}
	if got := lastCounts(w); !mapsEqual(got, want) {
		t.Fatalf("counts after rebuild = %v, want %v", got, want)
	}

	// State is scoped by uid: the same code under another uid starts over.
	other := &recorder{}
	chain = build(t, countJob("another-uid"), operators.TaskEnv{Task: 0, Store: store, Out: other})
	feed(chain, "alice")
	if got := other.lines(); !slices.Equal(got, []string{"counts alice=1"}) {
		t.Fatalf("other uid output = %q", got)
	}
}

func TestKeyedCountSurvivesCheckpointRestore(t *testing.T) {
	j := countJob("count-per-user")
	factory := state.NewMemoryFactory()
	backend, err := factory.Open(filepath.Join(t.TempDir(), "live"))
	if err != nil {
		t.Fatal(err)
	}
	store := state.NewStore(backend)
	w := &recorder{}
	chain := build(t, j, operators.TaskEnv{Store: store, Out: w})
	run(t, chain, rec("events", 0, 0, "alice", ""), rec("events", 0, 1, "bob", ""), rec("events", 0, 2, "alice", ""))

	// Barrier after offset 2, then a record that belongs to the next
	// checkpoint and is lost with the crash below.
	sealed := store.Seal()
	run(t, chain, rec("events", 0, 3, "alice", ""))
	chk := filepath.Join(t.TempDir(), "chk-1")
	files, err := store.Persist(sealed, chk)
	if err != nil {
		t.Fatalf("Persist: %v", err)
	}
	if err := store.Close(); err != nil {
		t.Fatal(err)
	}

	// Restore into another directory from copies of the checkpoint files,
	// as a new owner would, and replay from offset 3.
	restored := filepath.Join(t.TempDir(), "restored")
	for _, f := range files {
		data, err := os.ReadFile(filepath.Join(chk, filepath.FromSlash(f)))
		if err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(restored, filepath.FromSlash(f))
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(dst, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	backend, err = factory.Open(restored)
	if err != nil {
		t.Fatalf("open restored backend: %v", err)
	}
	store = state.NewStore(backend)
	t.Cleanup(func() { _ = store.Close() })
	after := &recorder{}
	chain = build(t, j, operators.TaskEnv{Store: store, Out: after})
	run(t, chain, rec("events", 0, 3, "alice", ""), rec("events", 0, 4, "bob", ""), rec("events", 0, 5, "carol", ""))
	if got, want := after.lines(), []string{"counts alice=3", "counts bob=2", "counts carol=1"}; !slices.Equal(got, want) {
		t.Fatalf("after restore\n got %q\nwant %q", got, want)
	}
}

func TestUnencodableKeyIsAnError(t *testing.T) {
	j := operators.NewJob("jsonkey")
	in := operators.FromKafka(j, "in", operators.Strings)
	keyed := operators.KeyBy(in, func(operators.Message) float64 { return math.NaN() }, state.JSON[float64]())
	out := operators.Process(keyed, "p", func(_ *operators.Context[float64], m operators.Message, out func(operators.Message)) error {
		out(m)
		return nil
	})
	operators.ToKafka(out, "out", stringKV)
	chain := build(t, j, operators.TaskEnv{Store: newStore(t), Out: &recorder{}})
	err := chain(rec("in", 0, 9, "k", "v"))
	if err == nil || !strings.Contains(err.Error(), "encode key") {
		t.Fatalf("error = %v, want a key encoding error", err)
	}
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func TestProcessErrors(t *testing.T) {
	boom := errors.New("boom")
	j := operators.NewJob("errs")
	in := operators.FromKafka(j, "in", operators.Strings)
	out := operators.Process(operators.KeyBy(in, func(m operators.Message) string { return m.Key }, state.String), "p",
		func(ctx *operators.Context[string], m operators.Message, out func(string)) error {
			if m.Value == "fail" {
				return boom
			}
			out(m.Value)
			return nil
		})
	operators.ToKafka(out, "out", func(s string) ([]byte, []byte, error) {
		if s == "unencodable" {
			return nil, nil, errors.New("cannot encode")
		}
		return nil, []byte(s), nil
	})
	chain := build(t, j, operators.TaskEnv{Store: newStore(t), Out: &recorder{}})
	run(t, chain, rec("in", 1, 0, "k", "fine"))

	err := chain(rec("in", 1, 1, "k", "fail"))
	var re *operators.RecordError
	if !errors.As(err, &re) || re.Topic != "in" || re.Partition != 1 || re.Offset != 1 || !errors.Is(err, boom) {
		t.Fatalf("fn error = %v, want a RecordError for in/1@1 wrapping boom", err)
	}
	if !strings.Contains(err.Error(), `operator "p"`) {
		t.Errorf("fn error %q does not name the operator", err)
	}

	err = chain(rec("in", 1, 2, "k", "unencodable"))
	if err == nil || !strings.Contains(err.Error(), "cannot encode") || strings.Contains(err.Error(), `operator "p"`) {
		t.Fatalf("downstream error = %v, want the serializer's error, not blamed on the operator", err)
	}

	err = chain(rec("elsewhere", 1, 7, "k", "v"))
	if err == nil || !strings.Contains(err.Error(), `topic "elsewhere" is not an input`) {
		t.Fatalf("unknown topic error = %v", err)
	}
}

type event struct {
	User string `json:"user"`
}

func jsonJob(name string) *operators.Job {
	j := operators.NewJob(name)
	in := operators.FromKafka(j, "events", operators.JSON[event]())
	operators.ToKafka(in, "users", func(e event) ([]byte, []byte, error) { return nil, []byte(e.User), nil })
	return j
}

func TestDeserializeErrorFails(t *testing.T) {
	chain := build(t, jsonJob("json"), operators.TaskEnv{Out: &recorder{}})
	err := chain(rec("events", 4, 17, "k", "{not json"))
	var re *operators.RecordError
	if !errors.As(err, &re) || re.Topic != "events" || re.Partition != 4 || re.Offset != 17 {
		t.Fatalf("error = %v, want a RecordError for events/4@17", err)
	}
	for _, s := range []string{"events/4", "offset 17", "deserialize", "JSON"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not contain %q", err, s)
		}
	}
}

func TestDeserializeErrorDeadLetter(t *testing.T) {
	j := jsonJob("dlq")
	j.OnDeserializeError(operators.DeadLetter("events-dlq"))
	if got, want := j.Outputs(), []string{"users", "events-dlq"}; !slices.Equal(got, want) {
		t.Errorf("Outputs() = %q, want %q", got, want)
	}
	w := &recorder{}
	chain := build(t, j, operators.TaskEnv{Out: w})
	bad := rec("events", 2, 41, "key-1", "{not json")
	bad.Headers = []kgo.RecordHeader{{Key: "trace", Value: []byte("t1")}}
	run(t, chain, rec("events", 2, 40, "", `{"user":"ann"}`), bad, rec("events", 2, 42, "", `{"user":"bo"}`))

	if got, want := w.lines(), []string{"users =ann", "events-dlq key-1={not json", "users =bo"}; !slices.Equal(got, want) {
		t.Fatalf("output\n got %q\nwant %q", got, want)
	}
	headers := map[string]string{}
	for _, h := range w.recs[1].Headers {
		headers[h.Key] = string(h.Value)
	}
	if headers["trace"] != "t1" || headers["sluice.topic"] != "events" || headers["sluice.partition"] != "2" ||
		headers["sluice.offset"] != "41" || !strings.Contains(headers["sluice.error"], "JSON") {
		t.Fatalf("dead letter headers = %v", headers)
	}
	if n := j.DeadLetters(); n != 1 {
		t.Fatalf("DeadLetters() = %d, want 1", n)
	}
}

// TestTasksRunConcurrently builds and runs several tasks of one job at once,
// as an instance owning several partitions does: under -race this checks that
// tasks share nothing but the read-only graph.
func TestTasksRunConcurrently(t *testing.T) {
	j := countJob("count-per-user")
	const tasks, perTask = 4, 200
	writers := make([]*recorder, tasks)
	errs := make(chan error, tasks)
	for task := range int32(tasks) {
		w := &recorder{}
		writers[task] = w
		store := newStore(t)
		go func() {
			chain, err := j.Build(operators.TaskEnv{Task: task, Store: store, Out: w})
			if err != nil {
				errs <- err
				return
			}
			for off := range int64(perTask) {
				if err := chain(rec("events", task, off, "user-"+strconv.Itoa(int(off%3)), "e")); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range tasks {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	for task, w := range writers {
		want := map[string]string{"user-0": "67", "user-1": "67", "user-2": "66"}
		if got := lastCounts(w); !mapsEqual(got, want) {
			t.Errorf("task %d counts = %v, want %v", task, got, want)
		}
	}
}

func TestValidate(t *testing.T) {
	noop := func(*operators.Context[string], operators.Message, func(operators.Message)) error { return nil }
	key := func(m operators.Message) string { return m.Key }
	tests := []struct {
		name string
		job  func() *operators.Job
		want []string
	}{
		{"bad job name", func() *operators.Job {
			j := operators.NewJob("my job/1")
			operators.ToKafka(operators.FromKafka(j, "in", operators.Strings), "out", stringKV)
			return j
		}, []string{`job name "my job/1"`}},
		{"dot dot job name", func() *operators.Job {
			j := operators.NewJob("..")
			operators.ToKafka(operators.FromKafka(j, "in", operators.Strings), "out", stringKV)
			return j
		}, []string{`job name ".." is not allowed`}},
		{"no source, no sink", func() *operators.Job {
			return operators.NewJob("empty")
		}, []string{"no source", "no sink"}},
		{"no sink", func() *operators.Job {
			j := operators.NewJob("nosink")
			operators.FromKafka(j, "in", operators.Strings)
			return j
		}, []string{"no sink", "operators.FromKafka at", "never consumed"}},
		{"duplicate uid", func() *operators.Job {
			j := operators.NewJob("dup")
			in := operators.FromKafka(j, "in", operators.Strings)
			a := operators.Process(operators.KeyBy(in, key, state.String), "agg", noop)
			b := operators.Process(operators.KeyBy(a, key, state.String), "agg", noop)
			operators.ToKafka(b, "out", stringKV)
			return j
		}, []string{`operator uid "agg" is used twice`}},
		{"bad uid and topics", func() *operators.Job {
			j := operators.NewJob("bad")
			in := operators.FromKafka(j, "", operators.Strings)
			p := operators.Process(operators.KeyBy(in, key, state.String), "a:b", noop)
			operators.ToKafka(p, "out!", stringKV)
			return j
		}, []string{"input topic is empty", `operator uid "a:b"`, `output topic "out!"`}},
		{"nil functions", func() *operators.Job {
			j := operators.NewJob("nils")
			in := operators.FromKafka[operators.Message](j, "in", nil)
			m := operators.Map[operators.Message, operators.Message](in, nil)
			operators.ToKafka(m, "out", nil)
			return j
		}, []string{"nil deserializer", "operators.Map at", "nil function", "nil serializer"}},
		{"bad dead-letter topic, long name, nil key", func() *operators.Job {
			j := operators.NewJob(strings.Repeat("x", 250))
			j.OnDeserializeError(operators.DeadLetter("dl q"))
			in := operators.FromKafka(j, "in", operators.Strings)
			p := operators.Process(operators.KeyBy[operators.Message, string](in, nil, nil), "p", noop)
			operators.ToKafka(p, "out", stringKV)
			return j
		}, []string{`dead-letter topic "dl q"`, "longer than 249", "nil key function", "nil key codec"}},
		{"merge across jobs, nil filter", func() *operators.Job {
			j := operators.NewJob("one")
			a := operators.FromKafka(j, "a", operators.Strings)
			b := operators.FromKafka(operators.NewJob("two"), "b", operators.Strings)
			m := operators.Filter(operators.Merge(a, b), nil)
			operators.ToKafka(m, "out", stringKV)
			return j
		}, []string{"streams of different jobs", "operators.Filter at"}},
		{"nil flatmap, maperr, process", func() *operators.Job {
			j := operators.NewJob("nils2")
			in := operators.FromKafka(j, "in", operators.Strings)
			f := operators.FlatMap[operators.Message, operators.Message](in, nil)
			m := operators.MapErr[operators.Message, operators.Message](f, nil)
			p := operators.Process[string, operators.Message, operators.Message](operators.KeyBy(m, key, state.String), "p", nil)
			operators.ToKafka(p, "out", stringKV)
			return j
		}, []string{"operators.FlatMap at", "operators.MapErr at", "operators.Process at"}},
		{"dead letter to an input", func() *operators.Job {
			j := operators.NewJob("loop")
			j.OnDeserializeError(operators.DeadLetter("in"))
			operators.ToKafka(operators.FromKafka(j, "in", operators.Strings), "out", stringKV)
			return j
		}, []string{`dead-letter topic "in" is also an input`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			j := tt.job()
			err := j.Validate()
			if err == nil {
				t.Fatal("Validate() = nil")
			}
			for _, s := range tt.want {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("Validate() = %q, does not contain %q", err, s)
				}
			}
			if _, berr := j.Build(operators.TaskEnv{Store: newStore(t), Out: &recorder{}}); berr == nil {
				t.Error("Build succeeded on an invalid job")
			}
		})
	}
}

func TestBuildNeedsStoreForState(t *testing.T) {
	_, err := countJob("c").Build(operators.TaskEnv{Task: 5, Out: &recorder{}})
	if err == nil || !strings.Contains(err.Error(), "no state store") || !strings.Contains(err.Error(), "task 5") {
		t.Fatalf("Build without store = %v", err)
	}
	if _, err := countJob("c").Build(operators.TaskEnv{Store: newStore(t)}); err == nil {
		t.Fatal("Build without sink writer succeeded")
	}
}

// discard is a sink.Writer that drops records, so benchmarks measure the
// chain, not a growing slice.
type discard struct{ recorder }

func (*discard) Write(*kgo.Record) {}

func BenchmarkChainMapOnly(b *testing.B) {
	j := operators.NewJob("bench")
	in := operators.FromKafka(j, "in", operators.Raw)
	out := operators.Map(in, func(r *kgo.Record) *kgo.Record { return r })
	operators.ToKafka(out, "out", func(r *kgo.Record) ([]byte, []byte, error) { return r.Key, r.Value, nil })
	chain := build(b, j, operators.TaskEnv{Out: &discard{}})
	r := rec("in", 0, 0, "key", "value")
	b.ReportAllocs()
	for b.Loop() {
		if err := chain(r); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkKeyedCount(b *testing.B) {
	j := countJob("count")
	chain := build(b, j, operators.TaskEnv{Store: newStore(b), Out: &discard{}})
	recs := make([]*kgo.Record, 1000)
	for i := range recs {
		recs[i] = rec("events", 0, int64(i), "user-"+strconv.Itoa(i%100), "e")
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if err := chain(recs[i%len(recs)]); err != nil {
			b.Fatal(err)
		}
		i++
	}
}
