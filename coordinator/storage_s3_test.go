package coordinator

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"

	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/sluice-stream/sluice/internal/example"
	"github.com/sluice-stream/sluice/internal/kafkatest"
	"github.com/sluice-stream/sluice/internal/s3test"
	"github.com/sluice-stream/sluice/source"
	"github.com/sluice-stream/sluice/state"
)

// s3Env is one S3 server of a test and a source of fresh bucket names.
type s3Env struct {
	srv *s3test.Server
	n   atomic.Int64
}

func newS3Env(t *testing.T, opts s3test.Options) *s3Env {
	t.Helper()
	return &s3Env{srv: s3test.Start(t, opts)}
}

// bucket creates a new bucket and returns its name.
func (e *s3Env) bucket(t *testing.T) string {
	t.Helper()
	name := fmt.Sprintf("sluice-%d", e.n.Add(1))
	e.srv.CreateBucket(t, name)
	return name
}

// config is the configuration of storage url on the server at endpoint
// (the server's, or a proxy's in front of it).
func (e *s3Env) config(url, endpoint string) S3Config {
	cfg := DefaultS3Config(url)
	cfg.Endpoint = endpoint
	cfg.PathStyle = true
	cfg.Region = s3test.Region
	cfg.Credentials = e.srv.Credentials()
	cfg.RetryMaxBackoff = 50 * time.Millisecond
	return cfg
}

func (e *s3Env) open(t *testing.T, url string) *S3Storage {
	t.Helper()
	return openS3(t, e.config(url, e.srv.Endpoint))
}

func openS3(t *testing.T, cfg S3Config) *S3Storage {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := NewS3Storage(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestS3Storage runs the Storage contract, racing creates included, on a
// real S3 server: at a bucket's root and below a prefix.
func TestS3Storage(t *testing.T) {
	env := newS3Env(t, s3test.Options{})
	t.Run("BucketRoot", func(t *testing.T) {
		storageContract(t, func(t *testing.T) Storage { return env.open(t, "s3://"+env.bucket(t)) })
	})
	t.Run("Prefix", func(t *testing.T) {
		bucket := env.bucket(t)
		var n atomic.Int64
		storageContract(t, func(t *testing.T) Storage {
			return env.open(t, fmt.Sprintf("s3://%s/checkpoints/run-%d/", bucket, n.Add(1)))
		})
	})
}

// TestS3StorageDetails covers what the contract does not: the prefix keeps
// storages apart, String, the conditional-write probe leaves nothing
// behind, and Put takes any reader.
func TestS3StorageDetails(t *testing.T) {
	ctx := context.Background()
	env := newS3Env(t, s3test.Options{})
	bucket := env.bucket(t)
	a := env.open(t, "s3://"+bucket+"/a")
	ab := env.open(t, "s3://"+bucket+"/a/b")
	root := env.open(t, "s3://"+bucket)

	if got, want := a.String(), "s3://"+bucket+"/a"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	if got, want := root.String(), "s3://"+bucket; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	if names, err := root.List(ctx, ""); err != nil || len(names) != 0 {
		t.Fatalf("probes left objects behind: %q, %v", names, err)
	}

	storagePut(t, a, "b/x", "in a")
	storagePut(t, ab, "y", "in a/b")
	storagePut(t, root, "z", "in root")
	for _, tc := range []struct {
		st   Storage
		want []string
	}{
		{a, []string{"b/x", "b/y"}},
		{ab, []string{"x", "y"}},
		{root, []string{"a/b/x", "a/b/y", "z"}},
	} {
		if got, err := tc.st.List(ctx, ""); err != nil || strings.Join(got, ",") != strings.Join(tc.want, ",") {
			t.Errorf("%s: List = %q, %v; want %q", tc.st, got, err, tc.want)
		}
	}

	// Put: a reader that is not seekable, one that spills to a temporary
	// file, and a file read from its current position.
	storagePutReader := func(name string, r io.Reader) {
		t.Helper()
		if err := a.Put(ctx, name, r); err != nil {
			t.Fatal(err)
		}
	}
	storagePutReader("stream", iotest.OneByteReader(strings.NewReader("not seekable")))
	if got := storageRead(t, a, "stream"); got != "not seekable" {
		t.Errorf("got %q", got)
	}
	big := bytes.Repeat([]byte("0123456789abcdef"), (putSpoolMemory+1<<20)/16)
	storagePutReader("big", iotest.HalfReader(bytes.NewReader(big)))
	if got := storageRead(t, a, "big"); got != string(big) {
		t.Errorf("big object: read back %d bytes, want %d", len(got), len(big))
	}
	path := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(path, []byte("skipped|content"), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Seek(int64(len("skipped|")), io.SeekStart); err != nil {
		t.Fatal(err)
	}
	storagePutReader("file", f)
	if got := storageRead(t, a, "file"); got != "content" {
		t.Errorf("file from offset: got %q", got)
	}
	if err := UploadFile(ctx, a, "upload", path); err != nil {
		t.Fatal(err)
	}
	if got := storageRead(t, a, "upload"); got != "skipped|content" {
		t.Errorf("UploadFile: got %q", got)
	}
	// A reader that fails fails the Put and writes nothing.
	boom := errors.New("boom")
	if err := a.Put(ctx, "broken", iotest.ErrReader(boom)); !errors.Is(err, boom) {
		t.Errorf("Put of a failing reader: %v", err)
	}
	if _, err := a.Get(ctx, "broken"); !errors.Is(err, ErrNotFound) {
		t.Errorf("failed Put left an object: %v", err)
	}
}

// TestS3RacingCreateTwoClients races two owners, each with its own client
// (as two processes would have), creating the same _metadata 50 times:
// exactly one wins each time and the object is the winner's.
func TestS3RacingCreateTwoClients(t *testing.T) {
	ctx := context.Background()
	env := newS3Env(t, s3test.Options{})
	url := "s3://" + env.bucket(t) + "/race"
	owners := [2]*S3Storage{env.open(t, url), env.open(t, url)}
	const pairs = 50
	wins := [2]int{}
	for i := range pairs {
		name := MetadataName("counts", int32(i%4), int64(i+1))
		var errs [2]error
		start := make(chan struct{})
		var wg sync.WaitGroup
		for o := range 2 {
			wg.Go(func() {
				<-start
				errs[o] = owners[o].Create(ctx, name, []byte(fmt.Sprintf("owner %d", o)))
			})
		}
		close(start)
		wg.Wait()
		winner := -1
		switch {
		case errs[0] == nil && errors.Is(errs[1], ErrExists):
			winner = 0
		case errs[1] == nil && errors.Is(errs[0], ErrExists):
			winner = 1
		default:
			t.Fatalf("pair %d: results %v, want exactly one winner and one ErrExists", i, errs)
		}
		wins[winner]++
		for _, st := range owners {
			if got := storageRead(t, st, name); got != fmt.Sprintf("owner %d", winner) {
				t.Fatalf("pair %d: object is %q, winner was %d", i, got, winner)
			}
		}
	}
	t.Logf("wins per owner: %v", wins)
}

// fakeS3 is a minimal S3 HTTP handler for stores that do not honour
// conditional writes: HeadBucket, PutObject (ignoring If-None-Match, or
// refusing it with 501) and DeleteObject.
type fakeS3 struct {
	mu      sync.Mutex
	objects map[string][]byte
	// notImplemented refuses If-None-Match with 501, as some stores do;
	// otherwise it is silently ignored.
	notImplemented bool
	// conflicts is how many conditional PUTs to answer 409
	// ConditionalRequestConflict; after them the key counts as existing
	// (412).
	conflicts int
	// honourAfterConflicts answers 412 for an existing key.
	honourAfterConflicts bool
}

func (f *fakeS3) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	body, _ := io.ReadAll(r.Body)
	parts := strings.SplitN(strings.TrimPrefix(r.URL.Path, "/"), "/", 2)
	switch {
	case r.Method == http.MethodHead && len(parts) == 1:
		w.WriteHeader(http.StatusOK)
	case r.Method == http.MethodPut && len(parts) == 2:
		if f.conflicts > 0 && r.Header.Get("If-None-Match") != "" {
			f.conflicts--
			w.WriteHeader(http.StatusConflict)
			fmt.Fprint(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>ConditionalRequestConflict</Code><Message>A conflicting conditional operation is currently in progress against this resource.</Message></Error>`)
			return
		}
		if _, ok := f.objects[r.URL.Path]; ok && r.Header.Get("If-None-Match") != "" && f.conflicts == 0 && f.honourAfterConflicts {
			w.WriteHeader(http.StatusPreconditionFailed)
			fmt.Fprint(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>PreconditionFailed</Code><Message>At least one of the pre-conditions you specified did not hold</Message></Error>`)
			return
		}
		if f.notImplemented && r.Header.Get("If-None-Match") != "" {
			w.WriteHeader(http.StatusNotImplemented)
			fmt.Fprint(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code><Message>A header you provided implies functionality that is not implemented</Message></Error>`)
			return
		}
		f.objects[r.URL.Path] = body
		w.Header().Set("ETag", `"0123"`)
		w.WriteHeader(http.StatusOK)
	case r.Method == http.MethodDelete && len(parts) == 2:
		delete(f.objects, r.URL.Path)
		w.WriteHeader(http.StatusNoContent)
	default:
		w.WriteHeader(http.StatusNotImplemented)
	}
}

// TestS3RefusesStoreWithoutConditionalWrites checks that NewS3Storage
// refuses, with a clear error, a store that ignores If-None-Match (a fake,
// and versitygw without metadata, which really does) or rejects it, and
// that it never names the credentials.
func TestS3RefusesStoreWithoutConditionalWrites(t *testing.T) {
	const access, secret = "AKIDSLUICETEST", "very-secret-key-material"
	cfgFor := func(endpoint string) S3Config {
		cfg := DefaultS3Config("s3://fake-bucket/jobs")
		cfg.Endpoint, cfg.PathStyle, cfg.Region = endpoint, true, "us-east-1"
		cfg.Credentials = credentials.NewStaticCredentialsProvider(access, secret, "")
		cfg.RetryMaxAttempts = 1
		return cfg
	}
	check := func(t *testing.T, cfg S3Config, want ...string) {
		t.Helper()
		_, err := NewS3Storage(context.Background(), cfg)
		if err == nil {
			t.Fatal("store accepted")
		}
		want = append(want, "the S3 store at "+cfg.URL+" does not honour If-None-Match: * conditional writes; Sluice needs them to complete checkpoints safely")
		for _, w := range want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("error %q\ndoes not say %q", err, w)
			}
		}
		if strings.Contains(err.Error(), secret) || strings.Contains(err.Error(), access) {
			t.Errorf("error names the credentials: %v", err)
		}
		t.Logf("refused: %v", err)
	}

	t.Run("Ignored", func(t *testing.T) {
		fake := &fakeS3{objects: map[string][]byte{}}
		srv := httptest.NewServer(fake)
		defer srv.Close()
		check(t, cfgFor(srv.URL), "second create of the same key succeeded")
		fake.mu.Lock()
		left := len(fake.objects)
		fake.mu.Unlock()
		if left != 0 {
			t.Errorf("probe object left behind")
		}
		// Without the check the same store is accepted (at the user's risk).
		cfg := cfgFor(srv.URL)
		cfg.CheckConditionalWrites = false
		if _, err := NewS3Storage(context.Background(), cfg); err != nil {
			t.Fatalf("without the check: %v", err)
		}
	})
	t.Run("NotImplemented", func(t *testing.T) {
		srv := httptest.NewServer(&fakeS3{objects: map[string][]byte{}, notImplemented: true})
		defer srv.Close()
		check(t, cfgFor(srv.URL), "conditional create was refused", "NotImplemented")
	})
	t.Run("VersitygwWithoutMetadata", func(t *testing.T) {
		// With --nometa versitygw keeps no ETags, so it cannot tell that an
		// object exists when it evaluates If-None-Match.
		env := newS3Env(t, s3test.Options{PosixFlags: []string{"--nometa"}})
		bucket := env.bucket(t)
		cfg := env.config("s3://"+bucket+"/jobs", env.srv.Endpoint)
		check(t, cfg, "second create of the same key succeeded")
	})
}

// TestS3CreateConflict: a 409 ConditionalRequestConflict (another
// conditional write in flight) is retried; the retry's answer decides, and
// conflicts that do not end give ErrCreateConflict, not ErrExists.
func TestS3CreateConflict(t *testing.T) {
	ctx := context.Background()
	fake := &fakeS3{objects: map[string][]byte{"/fake-bucket/jobs/a": []byte("other")}, honourAfterConflicts: true, conflicts: 2}
	srv := httptest.NewServer(fake)
	defer srv.Close()
	cfg := DefaultS3Config("s3://fake-bucket/jobs")
	cfg.Endpoint, cfg.PathStyle, cfg.Region = srv.URL, true, "us-east-1"
	cfg.Credentials = credentials.NewStaticCredentialsProvider("a", "b", "")
	cfg.CheckConditionalWrites = false
	st := openS3(t, cfg)
	if err := st.Create(ctx, "a", []byte("mine")); !errors.Is(err, ErrExists) {
		t.Fatalf("create after 2 conflicts on an existing key: %v, want ErrExists", err)
	}
	if err := st.Create(ctx, "b", []byte("mine")); err != nil {
		t.Fatalf("create of a new key: %v", err)
	}
	fake.mu.Lock()
	fake.conflicts = 1000
	fake.mu.Unlock()
	err := st.Create(ctx, "c", []byte("mine"))
	if !errors.Is(err, ErrCreateConflict) || errors.Is(err, ErrExists) || !strings.Contains(err.Error(), "s3://fake-bucket/jobs/c") {
		t.Fatalf("create under endless conflicts: %v, want ErrCreateConflict naming the object", err)
	}
}

// TestS3ConnectErrors checks the errors of an unusable bucket name the
// bucket and never the credentials.
func TestS3ConnectErrors(t *testing.T) {
	env := newS3Env(t, s3test.Options{})
	ctx := context.Background()
	cfg := env.config("s3://no-such-bucket/x", env.srv.Endpoint)
	if _, err := NewS3Storage(ctx, cfg); err == nil || !strings.Contains(err.Error(), "bucket no-such-bucket does not exist") {
		t.Errorf("missing bucket: %v", err)
	}
	bucket := env.bucket(t)
	cfg = env.config("s3://"+bucket, env.srv.Endpoint)
	cfg.Credentials = credentials.NewStaticCredentialsProvider(s3test.AccessKey, "wrong-secret-material", "")
	_, err := NewS3Storage(ctx, cfg)
	if err == nil || !strings.Contains(err.Error(), "access to bucket "+bucket+" denied") {
		t.Errorf("wrong secret: %v", err)
	}
	if err != nil && strings.Contains(err.Error(), "wrong-secret-material") {
		t.Errorf("error names the secret: %v", err)
	}
	// Nothing listens here.
	cfg = env.config("s3://"+bucket, "http://127.0.0.1:1")
	cfg.RetryMaxAttempts = 1
	if _, err := NewS3Storage(ctx, cfg); err == nil || !strings.Contains(err.Error(), "bucket "+bucket+" not reachable") {
		t.Errorf("no server: %v", err)
	}
	// Timeouts come from ctx.
	tctx, cancel := context.WithTimeout(ctx, time.Nanosecond)
	defer cancel()
	<-tctx.Done()
	if _, err := NewS3Storage(tctx, env.config("s3://"+bucket, env.srv.Endpoint)); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("expired context: %v", err)
	}
}

func TestParseS3URL(t *testing.T) {
	for _, tc := range []struct {
		in, bucket, prefix string
		bad                bool
	}{
		{in: "s3://bucket", bucket: "bucket"},
		{in: "s3://bucket/", bucket: "bucket"},
		{in: "s3://my.bucket-1/a/b", bucket: "my.bucket-1", prefix: "a/b"},
		{in: "s3://bucket/a/b/", bucket: "bucket", prefix: "a/b"},
		{in: "s3://abc/" + "x", bucket: "abc", prefix: "x"},
		{in: "bucket/a", bad: true},
		{in: "S3://bucket", bad: true},
		{in: "s3://", bad: true},
		{in: "s3://ab", bad: true},
		{in: "s3://Bucket", bad: true},
		{in: "s3://-bucket", bad: true},
		{in: "s3://bucket-", bad: true},
		{in: "s3://bu..cket", bad: true},
		{in: "s3://bu_cket", bad: true},
		{in: "s3://" + strings.Repeat("a", 64), bad: true},
		{in: "s3://bucket/a//b", bad: true},
		{in: "s3://bucket/../b", bad: true},
		{in: "s3://bucket//a", bad: true},
		{in: "s3://bucket/a?x=1", bad: true},
		{in: "s3://user:pass@bucket/a", bad: true},
	} {
		b, p, err := ParseS3URL(tc.in)
		if tc.bad {
			if err == nil {
				t.Errorf("ParseS3URL(%q) = %q, %q; want an error", tc.in, b, p)
			}
			continue
		}
		if err != nil || b != tc.bucket || p != tc.prefix {
			t.Errorf("ParseS3URL(%q) = %q, %q, %v; want %q, %q", tc.in, b, p, err, tc.bucket, tc.prefix)
		}
	}
}

// faultProxy stands between S3Storage and the server: it passes requests
// on, answers every request with 500 during an outage, and can lose the
// answers of conditional creates (the create happens, the client gets 500).
type faultProxy struct {
	rp     *httputil.ReverseProxy
	outage atomic.Bool
	// hang: requests get no answer until the client gives up (timeouts).
	hang    atomic.Bool
	hung    atomic.Int64
	mu      sync.Mutex
	lose    int   // conditional-create answers still to lose
	failed  int64 // requests answered 500 by the outage
	lostAns int64 // conditional creates done whose answer was lost
}

func newFaultProxy(t *testing.T, target string) (*faultProxy, string) {
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	p := &faultProxy{rp: httputil.NewSingleHostReverseProxy(u)}
	srv := httptest.NewServer(p)
	t.Cleanup(srv.Close)
	return p, srv.URL
}

func s3InternalError(w http.ResponseWriter) {
	w.WriteHeader(http.StatusInternalServerError)
	fmt.Fprint(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code><Message>injected by the test proxy</Message></Error>`)
}

func (p *faultProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if p.hang.Load() {
		p.hung.Add(1)
		for p.hang.Load() && r.Context().Err() == nil {
			time.Sleep(20 * time.Millisecond)
		}
		s3InternalError(w) // too late for a client that gave up
		return
	}
	if p.outage.Load() {
		_, _ = io.Copy(io.Discard, r.Body)
		p.mu.Lock()
		p.failed++
		p.mu.Unlock()
		s3InternalError(w)
		return
	}
	if r.Method == http.MethodPut && r.Header.Get("If-None-Match") != "" {
		p.mu.Lock()
		lose := p.lose > 0
		if lose {
			p.lose--
		}
		p.mu.Unlock()
		if lose {
			rec := httptest.NewRecorder()
			p.rp.ServeHTTP(rec, r)
			if rec.Code == http.StatusOK {
				p.mu.Lock()
				p.lostAns++
				p.mu.Unlock()
			}
			s3InternalError(w)
			return
		}
	}
	p.rp.ServeHTTP(w, r)
}

func (p *faultProxy) loseCreates(n int) {
	p.mu.Lock()
	p.lose = n
	p.mu.Unlock()
}

func (p *faultProxy) counts() (failed, lost int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.failed, p.lostAns
}

// TestS3CreateLostAnswer: a create that happened but whose answer was lost
// is retried by the SDK and then reported ErrExists, with the object being
// this create's, which is how the protocol recognises its own write.
func TestS3CreateLostAnswer(t *testing.T) {
	ctx := context.Background()
	env := newS3Env(t, s3test.Options{})
	proxy, endpoint := newFaultProxy(t, env.srv.Endpoint)
	st := openS3(t, env.config("s3://"+env.bucket(t)+"/lost", endpoint))
	proxy.loseCreates(1)
	err := st.Create(ctx, "job/tasks/0/chk-1/_metadata", []byte("mine"))
	if !errors.Is(err, ErrExists) {
		t.Fatalf("create with a lost answer: %v, want ErrExists after the retry", err)
	}
	if _, lost := proxy.counts(); lost != 1 {
		t.Fatalf("%d answers lost, want 1", lost)
	}
	if got := storageRead(t, st, "job/tasks/0/chk-1/_metadata"); got != "mine" {
		t.Fatalf("object is %q", got)
	}
}

// gatedInput serves fixed input partitions, but only up to a limit the test
// raises, so a job can be stopped or disturbed halfway through its input.
type gatedInput struct {
	topic string
	parts map[int32][]*kgo.Record
	avail atomic.Int64 // records available per partition
}

func (in *gatedInput) StartOffsets(context.Context, int32) (map[string]int64, error) {
	return map[string]int64{in.topic: 0}, nil
}

func (in *gatedInput) CheckAvailable(context.Context, int32, map[string]int64) error { return nil }

func (in *gatedInput) CommitOffsets(context.Context, int32, map[string]int64) error { return nil }

func (in *gatedInput) Open(_ context.Context, task int32, offsets map[string]int64) (Feed, error) {
	f := &fakeFeed{c: make(chan source.Batch), done: make(chan struct{})}
	recs := in.parts[task]
	go func() {
		for pos := offsets[in.topic]; pos < int64(len(recs)); {
			end := min(pos+7, in.avail.Load(), int64(len(recs)))
			if end <= pos {
				select {
				case <-f.done:
					return
				case <-time.After(time.Millisecond):
				}
				continue
			}
			select {
			case f.c <- source.Batch{Records: recs[pos:end]}:
				pos = end
			case <-f.done:
				return
			}
		}
	}()
	return f, nil
}

// s3JobRun runs the count job on S3 storage in the background.
type s3JobRun struct {
	in     *Instance
	cancel context.CancelFunc
	done   chan error
}

func startS3Job(st Storage, broker *fakeBroker, input Input, f state.Factory, workDir string, settings Settings, hook Hook) *s3JobRun {
	in := NewInstance(InstanceConfig{
		Job: example.CountJob("counts", "events", "counts"), Storage: st,
		Sink: &fakeSink{b: broker, pool: settings.MaxPending + 1}, State: f, Input: input,
		Tasks: []int32{0, 1}, WorkDir: workDir, Settings: settings, ID: "s3", Hook: hook,
	})
	ctx, cancel := context.WithCancel(context.Background())
	r := &s3JobRun{in: in, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- in.Run(ctx) }()
	return r
}

func (r *s3JobRun) stop(t *testing.T) {
	t.Helper()
	r.cancel()
	if err := <-r.done; err != nil {
		t.Fatalf("instance: %v", err)
	}
}

func s3TestSettings() Settings {
	s := DefaultSettings()
	s.Interval = 20 * time.Millisecond
	s.Retained = 2
	s.StopTimeout = 20 * time.Second
	return s
}

// checkS3FinalState loads every task's newest checkpoint from S3 with the
// given state backend and compares the counting state with the true counts.
func checkS3FinalState(t *testing.T, st Storage, f state.Factory, parts int32, want map[string]int64) {
	t.Helper()
	ctx := context.Background()
	for p := range parts {
		ids, err := ListCheckpointIDs(ctx, st, "counts", p)
		if err != nil || len(ids) == 0 {
			t.Fatalf("task %d: no checkpoint (%v)", p, err)
		}
		c, err := LoadCheckpoint(ctx, st, "counts", p, ids[0])
		if err != nil {
			t.Fatal(err)
		}
		store, err := OpenCheckpointState(ctx, st, f, c, t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		kafkatest.CheckCountState(t, store, p, want)
		store.Close()
	}
}

// TestS3CheckpointCycle runs the count job with Pebble state on S3: crashes
// at protocol steps (the task recovers from its newest S3 checkpoint), then
// a stop halfway and a new process (new client, new local folder) that
// resumes from S3. The committed output holds every input's output exactly
// once and the final checkpoint's state equals the true counts.
func TestS3CheckpointCycle(t *testing.T) {
	const parts, perPart = 2, 300
	env := newS3Env(t, s3test.Options{})
	url := "s3://" + env.bucket(t) + "/cycle"
	records, want := genInput("events", parts, perPart)
	input := &gatedInput{topic: "events", parts: records}
	broker := newFakeBroker()
	pf := state.NewPebbleFactory(8 << 20)
	defer pf.Close()

	// Crash once at each of these steps, in this order.
	crashAt := []Step{StepUploaded, StepMetadataCreated, StepTxnCommitted, StepClaimed, StepFenced}
	var mu sync.Mutex
	hook := func(task int32, s Step, id int64) error {
		mu.Lock()
		defer mu.Unlock()
		if len(crashAt) > 0 && crashAt[0] == s {
			crashAt = crashAt[1:]
			return ErrCrash
		}
		return nil
	}
	input.avail.Store(perPart / 2)
	run := startS3Job(env.open(t, url), broker, input, pf, t.TempDir(), s3TestSettings(), hook)
	waitFor(t, 60*time.Second, "half the output committed after every crash", func() bool {
		mu.Lock()
		crashesLeft := len(crashAt)
		mu.Unlock()
		return crashesLeft == 0 && len(broker.readCommitted("counts")) == parts*perPart/2
	})
	run.stop(t)
	restored := int64(0)
	for _, s := range run.in.Stats() {
		restored = max(restored, s.Restored.Load())
	}
	if restored == 0 {
		t.Error("no task restored a checkpoint after its crashes")
	}

	// A new process resumes from S3.
	input.avail.Store(perPart)
	run = startS3Job(env.open(t, url), broker, input, pf, t.TempDir(), s3TestSettings(), nil)
	waitFor(t, 60*time.Second, "all output committed", func() bool {
		n := len(broker.readCommitted("counts"))
		if n > parts*perPart {
			t.Fatalf("%d committed outputs for %d inputs", n, parts*perPart)
		}
		return n == parts*perPart
	})
	run.stop(t)
	for task, s := range run.in.Stats() {
		if s.Restored.Load() == 0 {
			t.Errorf("task %d of the second process did not restore from S3", task)
		}
	}
	kafkatest.CheckCounts(t, broker.readCommitted("counts"), want)
	checkS3FinalState(t, env.open(t, url), pf, parts, want)
}

// TestS3Outage puts a proxy answering 500 in front of the server for a
// while, then one that does not answer at all (timeouts): checkpoints fail, but the job goes on processing and commits
// nothing without a checkpoint; once every transactional id is pending on a
// failed checkpoint the task restarts from its newest complete checkpoint
// (retrying while the store is down). When the store is back, the first
// create answers are lost (the owner recognises its own writes) and the
// output holds every input exactly once.
func TestS3Outage(t *testing.T) {
	const parts, perPart = 2, 300
	env := newS3Env(t, s3test.Options{})
	proxy, endpoint := newFaultProxy(t, env.srv.Endpoint)
	cfg := env.config("s3://"+env.bucket(t)+"/outage", endpoint)
	cfg.RetryMaxAttempts = 2
	st := openS3(t, cfg)
	records, want := genInput("events", parts, perPart)
	input := &gatedInput{topic: "events", parts: records}
	broker := newFakeBroker()
	settings := s3TestSettings()
	settings.TolerableFailures = 10
	settings.Timeout = 5 * time.Second

	input.avail.Store(100)
	run := startS3Job(st, broker, input, state.NewMemoryFactory(), t.TempDir(), settings, nil)
	committed := func() int { return len(broker.readCommitted("counts")) }
	stats := func() (in, failed int64) {
		for _, s := range run.in.Stats() {
			in += s.RecordsIn.Load()
			failed += s.CheckpointsFailed.Load()
		}
		return in, failed
	}
	waitFor(t, 30*time.Second, "first 100 records of each task committed", func() bool { return committed() == parts*100 })

	// First the store stops answering: requests time out.
	proxy.hang.Store(true)
	t.Cleanup(func() { proxy.hang.Store(false) }) // a failed test must not hang
	_, failedBefore := stats()
	time.Sleep(3 * settings.Interval) // checkpoints in flight end
	atOutage := committed()
	input.avail.Store(150)
	waitFor(t, 60*time.Second, "checkpoints failed by timeouts", func() bool {
		_, failed := stats()
		return proxy.hung.Load() >= 2 && failed >= failedBefore+2
	})
	if n := committed(); n != atOutage {
		t.Fatalf("output committed while the store hung: %d, was %d", n, atOutage)
	}

	// Then it answers every request with 500.
	proxy.outage.Store(true)
	proxy.hang.Store(false)
	_, failedHung := stats()
	input.avail.Store(200)
	waitFor(t, 30*time.Second, "records processed and checkpoints failed during the outage", func() bool {
		in, failed := stats()
		return in >= parts*200 && failed >= failedHung+4
	})
	time.Sleep(time.Second) // long enough for the tasks to restart and fail to recover
	if n := committed(); n != atOutage {
		t.Fatalf("output committed during the outage: %d, was %d", n, atOutage)
	}
	failedReq, _ := proxy.counts()

	// The store is back, but the first answers to creates are lost.
	proxy.loseCreates(3)
	proxy.outage.Store(false)
	input.avail.Store(perPart)
	waitFor(t, 60*time.Second, "all output committed after the outage", func() bool {
		n := committed()
		if n > parts*perPart {
			t.Fatalf("%d committed outputs for %d inputs", n, parts*perPart)
		}
		return n == parts*perPart
	})
	run.stop(t)
	_, lost := proxy.counts()
	_, failed := stats()
	t.Logf("requests failed by the outage: %d; requests timed out: %d; checkpoints failed: %d; create answers lost: %d", failedReq, proxy.hung.Load(), failed-failedBefore, lost)
	if lost == 0 {
		t.Error("no create answer was lost: the lost-answer path was not exercised")
	}
	kafkatest.CheckCounts(t, broker.readCommitted("counts"), want)
	checkS3FinalState(t, st, state.NewMemoryFactory(), parts, want)
}

// TestS3RetentionKeepsNoOrphans: many incremental checkpoints on S3 leave
// exactly the retained checkpoints and the files they reference.
func TestS3RetentionKeepsNoOrphans(t *testing.T) {
	env := newS3Env(t, s3test.Options{})
	checkRetentionKeepsNoOrphans(t, env.open(t, "s3://"+env.bucket(t)+"/retention"))
}

// TestS3Savepoint: the savepoint format on S3 (conditional create of the
// parts and _metadata, verified state files, dispose).
func TestS3Savepoint(t *testing.T) {
	env := newS3Env(t, s3test.Options{})
	checkSavepointFormat(t, env.open(t, "s3://"+env.bucket(t)+"/savepoints"))
}
