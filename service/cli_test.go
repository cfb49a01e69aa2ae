package service

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sluice-stream/sluice/coordinator"
	"github.com/sluice-stream/sluice/internal/example"
	"github.com/sluice-stream/sluice/internal/s3test"
	"github.com/sluice-stream/sluice/sink"
)

var created = time.Date(2026, 5, 1, 10, 0, 0, 0, time.UTC)

// writeCheckpoint completes checkpoint id of a task the way a task does:
// create-if-absent of its encoded metadata.
func writeCheckpoint(t *testing.T, st coordinator.Storage, c *coordinator.Checkpoint) {
	t.Helper()
	b, err := coordinator.EncodeCheckpoint(c)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Create(context.Background(), coordinator.MetadataName(c.Job, c.Task, c.ID), b); err != nil {
		t.Fatal(err)
	}
}

func putObject(t *testing.T, st coordinator.Storage, name, content string) {
	t.Helper()
	if err := st.Put(context.Background(), name, strings.NewReader(content)); err != nil {
		t.Fatal(err)
	}
}

func checkpointOf(job string, task int32, id int64, kind coordinator.Kind, offset int64, files []coordinator.FileRef, pending int) *coordinator.Checkpoint {
	c := &coordinator.Checkpoint{
		Job: job, Task: task, ID: id, Kind: kind, Owner: "host-1", CreatedAt: created.Add(time.Duration(id) * time.Second),
		Offsets: map[string]int64{"events": offset, "clicks": offset / 2}, Files: files,
		CommittedOffsets: map[string]int64{"events": offset, "clicks": offset / 2},
	}
	for i := range pending {
		cid := id - int64(i)
		c.Pending = append(c.Pending, coordinator.PendingTxn{
			CheckpointID: cid, Offsets: c.Offsets,
			Committable: sink.Committable{CheckpointID: cid, TransactionalID: "sluice-j-0-0", ProducerID: 7, Epoch: 1},
		})
	}
	return c
}

// writeListFixture writes checkpoints of job "j" for `checkpoints list`:
//
//	task 0:  1, 2 (two files, one pending transaction), 3 (a claim)
//	task 1:  5; 6 corrupt (bad checksum); 7 partial (no metadata); 8 the
//	         metadata of 5 copied (describes another path); 9 of a newer
//	         version
//	task 2:  only shared files, no complete checkpoint
//	task 10: 1 (sorted after 2)
//
// and, not tasks: tasks/x/, tasks/007/, a file tasks/3, another job.
func writeListFixture(t *testing.T, st coordinator.Storage) {
	t.Helper()
	files := []coordinator.FileRef{
		{Name: "000004.sst", Object: "shared/host-1-000004.sst", Size: 3 << 20},
		{Name: "MANIFEST-000001", Object: "chk-2/MANIFEST-000001", Size: 512},
	}
	writeCheckpoint(t, st, checkpointOf("j", 0, 1, coordinator.KindCheckpoint, 10, files[:1], 0))
	writeCheckpoint(t, st, checkpointOf("j", 0, 2, coordinator.KindCheckpoint, 20, files, 1))
	writeCheckpoint(t, st, checkpointOf("j", 0, 3, coordinator.KindClaim, 20, files, 1))
	putObject(t, st, "j/tasks/0/shared/host-1-000004.sst", "sst")

	five := checkpointOf("j", 1, 5, coordinator.KindCheckpoint, 50, nil, 0)
	writeCheckpoint(t, st, five)
	b, err := coordinator.EncodeCheckpoint(checkpointOf("j", 1, 6, coordinator.KindCheckpoint, 60, nil, 0))
	if err != nil {
		t.Fatal(err)
	}
	putObject(t, st, coordinator.MetadataName("j", 1, 6), strings.Replace(string(b), `"events":60`, `"events":61`, 1))
	putObject(t, st, coordinator.CheckpointPrefix("j", 1, 7)+"MANIFEST-000002", "partial")
	b, err = coordinator.EncodeCheckpoint(five)
	if err != nil {
		t.Fatal(err)
	}
	putObject(t, st, coordinator.MetadataName("j", 1, 8), string(b))
	putObject(t, st, coordinator.MetadataName("j", 1, 9), `{"format":"sluice-checkpoint","version":99,"sha256":"","body":{}}`)

	putObject(t, st, "j/tasks/2/shared/host-2-000009.sst", "sst")
	writeCheckpoint(t, st, checkpointOf("j", 10, 1, coordinator.KindCheckpoint, 100, nil, 0))

	putObject(t, st, "j/tasks/x/chk-1/_metadata", "not a task")
	putObject(t, st, "j/tasks/007/chk-1/_metadata", "not a task")
	putObject(t, st, "j/tasks/3", "not a folder")
	writeCheckpoint(t, st, checkpointOf("other", 4, 1, coordinator.KindCheckpoint, 1, nil, 0))
}

func newListFixture(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ckpt")
	st, err := coordinator.NewLocalStorage(dir)
	if err != nil {
		t.Fatal(err)
	}
	writeListFixture(t, st)
	return dir
}

// runToolArgs runs a tool command line in env and returns its status and
// outputs.
func runToolArgs(t *testing.T, job string, args ...string) (status int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	env := toolEnv{stdout: &out, stderr: &errOut}
	if job != "" {
		env.job = example.CountJob(job, "events", "counts")
	}
	status = dispatchTool(context.Background(), args, env)
	return status, out.String(), errOut.String()
}

// tableRows splits a text table into rows of fields; fields are separated
// by two or more spaces.
func tableRows(s string) [][]string {
	var rows [][]string
	sep := regexp.MustCompile(`\s{2,}`)
	for line := range strings.Lines(s) {
		rows = append(rows, sep.Split(strings.TrimSpace(line), -1))
	}
	return rows
}

func TestCheckpointsListTable(t *testing.T) {
	dir := newListFixture(t)
	status, out, errOut := runToolArgs(t, "", "checkpoints", "list", "--checkpoint-dir", dir, "--job", "j")
	if status != 0 {
		t.Fatalf("status %d, stderr:\n%s", status, errOut)
	}
	t.Logf("\n%s", out)
	rows := tableRows(out)
	want := [][]string{
		{"TASK", "CHECKPOINT", "STATUS", "KIND", "CREATED", "FILES", "SIZE", "PENDING", "OFFSETS"},
		{"0", "3", "complete", "claim", "2026-05-01T10:00:03.000Z", "2", "3.0 MiB", "1", "clicks=10,events=20"},
		{"0", "2", "complete", "checkpoint", "2026-05-01T10:00:02.000Z", "2", "3.0 MiB", "1", "clicks=10,events=20"},
		{"0", "1", "complete", "checkpoint", "2026-05-01T10:00:01.000Z", "1", "3.0 MiB", "0", "clicks=5,events=10"},
		{"1", "9", "UNSUPPORTED", "-", "-", "-", "-", "-", "error: "},
		{"1", "8", "CORRUPT", "-", "-", "-", "-", "-", "error: "},
		{"1", "6", "CORRUPT", "-", "-", "-", "-", "-", "error: "},
		{"1", "5", "complete", "checkpoint", "2026-05-01T10:00:05.000Z", "0", "0 B", "0", "clicks=25,events=50"},
		{"2", "-", "none", "-", "-", "-", "-", "-", "no complete checkpoint"},
		{"10", "1", "complete", "checkpoint", "2026-05-01T10:00:01.000Z", "0", "0 B", "0", "clicks=50,events=100"},
	}
	if len(rows) != len(want) {
		t.Fatalf("%d rows, want %d:\n%s", len(rows), len(want), out)
	}
	for i := range want {
		got := slices.Clone(rows[i])
		if last := len(got) - 1; last >= 0 && strings.HasPrefix(got[last], "error: ") {
			got[last] = "error: " // checked below
		}
		if !slices.Equal(got, want[i]) {
			t.Errorf("row %d = %q, want %q", i, rows[i], want[i])
		}
	}
	for _, w := range []string{
		"version 99", // task 1, checkpoint 9
		"describes job \"j\" task 1 checkpoint 5", // checkpoint 8
		"checksum mismatch",                       // checkpoint 6
	} {
		if !strings.Contains(out, w) {
			t.Errorf("the table does not say %q", w)
		}
	}
	// Corrupt metadata is a warning, not a failure.
	for _, w := range []string{"warning: task 1 checkpoint 6: corrupt metadata", "warning: task 1 checkpoint 9: unsupported metadata"} {
		if !strings.Contains(errOut, w) {
			t.Errorf("stderr does not say %q:\n%s", w, errOut)
		}
	}
}

func TestCheckpointsListJSON(t *testing.T) {
	dir := newListFixture(t)
	// The job defaults to the binary's own (service.Main), and a file URL
	// works as well as a path.
	status, out, errOut := runToolArgs(t, "j", "checkpoints", "list", "--checkpoint-dir", "file://"+dir, "--json", "--task", "1")
	if status != 0 {
		t.Fatalf("status %d, stderr:\n%s", status, errOut)
	}
	var got []checkpointJSON
	var raw []map[string]any
	for line := range strings.Lines(out) {
		var c checkpointJSON
		if err := json.Unmarshal([]byte(line), &c); err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		got = append(got, c)
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatal(err)
		}
		raw = append(raw, m)
	}
	var ids []int64
	var statuses []checkpointStatus
	for _, c := range got {
		if c.Job != "j" || c.Task != 1 {
			t.Errorf("line of job %q task %d", c.Job, c.Task)
		}
		ids = append(ids, c.ID)
		statuses = append(statuses, c.Status)
	}
	if want := []int64{9, 8, 6, 5}; !slices.Equal(ids, want) {
		t.Fatalf("ids %v, want %v:\n%s", ids, want, out)
	}
	if want := []checkpointStatus{statusUnsupported, statusCorrupt, statusCorrupt, statusComplete}; !slices.Equal(statuses, want) {
		t.Fatalf("statuses %v, want %v", statuses, want)
	}
	ok := got[3]
	if ok.Kind != coordinator.KindCheckpoint || ok.Owner != "host-1" || ok.CreatedAt != "2026-05-01T10:00:05.000Z" ||
		ok.Offsets["events"] != 50 || ok.CommittedOffsets["clicks"] != 25 ||
		ok.Files == nil || *ok.Files != 0 || ok.SizeBytes == nil || *ok.SizeBytes != 0 || ok.Pending == nil || *ok.Pending != 0 || ok.Error != "" {
		t.Errorf("complete checkpoint: %+v", ok)
	}
	// A complete checkpoint has its counts even when zero; an unreadable
	// one has an error and no metadata fields.
	for _, k := range []string{"files", "size_bytes", "pending_transactions", "offsets"} {
		if _, ok := raw[3][k]; !ok {
			t.Errorf("complete checkpoint without %q: %v", k, raw[3])
		}
	}
	for _, k := range []string{"files", "kind", "created_at", "offsets"} {
		if _, ok := raw[2][k]; ok {
			t.Errorf("corrupt checkpoint with %q: %v", k, raw[2])
		}
	}
	if !strings.Contains(got[2].Error, "checksum mismatch") {
		t.Errorf("corrupt checkpoint's error: %q", got[2].Error)
	}

	// Task 0 in full.
	status, out, _ = runToolArgs(t, "j", "checkpoints", "list", "--checkpoint-dir", dir, "--json", "--task", "0")
	if status != 0 {
		t.Fatal(status)
	}
	var c checkpointJSON
	if err := json.Unmarshal([]byte(strings.SplitN(out, "\n", 2)[0]), &c); err != nil {
		t.Fatal(err)
	}
	if c.ID != 3 || c.Kind != coordinator.KindClaim || *c.Files != 2 || *c.SizeBytes != 3<<20+512 || *c.Pending != 1 {
		t.Errorf("newest of task 0: %+v", c)
	}
}

// TestCheckpointsListUnreadable: a storage error on one checkpoint's
// metadata is listed, and makes the status 1 (the listing is incomplete).
func TestCheckpointsListUnreadable(t *testing.T) {
	ctx := context.Background()
	mem := coordinator.NewMemStorage()
	writeListFixture(t, mem)
	st := coordinator.NewFaultyStorage(mem)
	boom := errors.New("injected: connection reset")
	st.SetFault(func(op coordinator.Op, name string) error {
		if op == coordinator.OpGet && name == coordinator.MetadataName("j", 0, 2) {
			return boom
		}
		return nil
	})
	tasks, err := listTasks(ctx, st, "j")
	if err != nil {
		t.Fatal(err)
	}
	if want := []int32{0, 1, 2, 10}; !slices.Equal(tasks, want) {
		t.Fatalf("tasks %v, want %v", tasks, want)
	}
	listed, err := listCheckpoints(ctx, st, "j", []int32{0})
	if err != nil {
		t.Fatal(err)
	}
	if len(listed) != 3 || listed[1].ID != 2 || listed[1].Status != statusUnreadable || !errors.Is(listed[1].Err, boom) {
		t.Fatalf("listed %+v", listed)
	}
	var out bytes.Buffer
	if err := writeCheckpointsTable(&out, []int32{0}, listed); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "UNREADABLE") || !strings.Contains(out.String(), "connection reset") {
		t.Errorf("table:\n%s", out.String())
	}

	// A listing that fails fails the command.
	st.SetFault(func(op coordinator.Op, name string) error {
		if op == coordinator.OpList {
			return boom
		}
		return nil
	})
	if _, err := listTasks(ctx, st, "j"); !errors.Is(err, boom) || !strings.Contains(err.Error(), `job "j"`) {
		t.Fatalf("err = %v", err)
	}
}

func TestCheckpointsListErrors(t *testing.T) {
	dir := newListFixture(t)
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(t.TempDir(), "missing")
	for _, tc := range []struct {
		name   string
		job    string // the binary's job, "" for none
		args   []string
		status int
		want   string
		stdout bool // want it on stdout rather than stderr
	}{
		{"group without command", "", []string{"checkpoints"}, 2, "usage: ", false},
		{"group help", "", []string{"checkpoints", "-h"}, 0, "checkpoints list", true},
		{"unknown subcommand", "", []string{"checkpoints", "frob"}, 2, `unknown command "checkpoints frob"`, false},
		{"help", "", []string{"checkpoints", "list", "-h"}, 0, "-s3-endpoint", false},
		{"bad scheme", "", []string{"checkpoints", "list", "--job", "j", "--checkpoint-dir", "gs://bucket/x"}, 2, `unknown scheme "gs"`, false},
		{"bad bucket", "", []string{"checkpoints", "list", "--job", "j", "--checkpoint-dir", "s3://B/x"}, 2, `bucket name "B"`, false},
		{"s3 flag for a directory", "", []string{"checkpoints", "list", "--job", "j", "--checkpoint-dir", dir, "--s3-endpoint", "http://x:9000"}, 2,
			"--s3-endpoint given, but --checkpoint-dir", false},
		{"no job", "", []string{"checkpoints", "list", "--checkpoint-dir", dir}, 2, "--job is required", false},
		{"bad job", "", []string{"checkpoints", "list", "--checkpoint-dir", dir, "--job", "../j"}, 2, `--job "../j" is not a job name`, false},
		{"bad task", "", []string{"checkpoints", "list", "--checkpoint-dir", dir, "--job", "j", "--task", "-2"}, 2, `invalid value "-2" for flag -task: want a task number >= 0`, false},
		{"stray argument", "", []string{"checkpoints", "list", "--checkpoint-dir", dir, "--job", "j", "extra"}, 2, "unexpected arguments", false},
		{"bad flag", "", []string{"checkpoints", "list", "--frob"}, 2, "flag provided but not defined", false},
		{"missing directory", "", []string{"checkpoints", "list", "--checkpoint-dir", missing, "--job", "j"}, 1, missing + " does not exist", false},
		{"not a directory", "", []string{"checkpoints", "list", "--checkpoint-dir", file, "--job", "j"}, 1, "is not a directory", false},
		{"unknown job", "nope", []string{"checkpoints", "list", "--checkpoint-dir", dir}, 1, `no checkpoints of job "nope" in file://`, false},
		{"unknown task", "", []string{"checkpoints", "list", "--checkpoint-dir", dir, "--job", "j", "--task", "4"}, 1, `job "j" has no task 4`, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, out, errOut := runToolArgs(t, tc.job, tc.args...)
			where := errOut
			if tc.stdout {
				where = out
			}
			if status != tc.status || !strings.Contains(where, tc.want) {
				t.Fatalf("status %d, stdout %q, stderr %q; want status %d and %q", status, out, errOut, tc.status, tc.want)
			}
		})
	}
	if _, err := os.Stat(missing); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("listing created the missing directory: %v", err)
	}
}

func TestToolDispatch(t *testing.T) {
	if !IsToolCommand("checkpoints") || IsToolCommand("run") || IsToolCommand("list") || IsToolCommand("") {
		t.Error("IsToolCommand")
	}
	if u := ToolUsage(); !strings.Contains(u, "  checkpoints list ") || !strings.Contains(u, "list the complete checkpoints") {
		t.Errorf("ToolUsage() = %q", u)
	}
	var out, errOut bytes.Buffer
	if status := ToolCommand([]string{"frob"}, &out, &errOut); status != 2 || !strings.Contains(errOut.String(), `unknown command "frob"`) {
		t.Errorf("status %d, stderr %q", status, errOut.String())
	}
}

// TestCheckpointsListS3 lists checkpoints in a bucket of a real S3 server,
// located by the same flags as `run`.
func TestCheckpointsListS3(t *testing.T) {
	srv := s3test.Start(t, s3test.Options{})
	s3test.UseCredentials(t)
	srv.CreateBucket(t, "ckpt")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	o := coordinator.StorageOptions{Endpoint: srv.Endpoint, Region: s3test.Region, PathStyle: true}
	st, err := coordinator.OpenStorage(ctx, "s3://ckpt/prod/", o)
	if err != nil {
		t.Fatal(err)
	}
	writeListFixture(t, st)
	status, out, errOut := runToolArgs(t, "", "checkpoints", "list", "--checkpoint-dir", "s3://ckpt/prod",
		"--s3-endpoint", srv.Endpoint, "--s3-region", s3test.Region, "--s3-path-style", "--job", "j")
	if status != 0 {
		t.Fatalf("status %d, stderr:\n%s", status, errOut)
	}
	rows := tableRows(out)
	if len(rows) != 10 || !slices.Equal(rows[1][:4], []string{"0", "3", "complete", "claim"}) || rows[5][2] != "CORRUPT" {
		t.Fatalf("listing:\n%s", out)
	}
	// Read-only: no probe, nothing written.
	names, err := st.List(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if !strings.HasPrefix(n, "j/") && !strings.HasPrefix(n, "other/") {
			t.Errorf("unexpected object %q", n)
		}
	}

	status, _, errOut = runToolArgs(t, "", "checkpoints", "list", "--checkpoint-dir", "s3://no-such-bucket/prod",
		"--s3-endpoint", srv.Endpoint, "--s3-path-style", "--job", "j")
	if status != 1 || !strings.Contains(errOut, "bucket no-such-bucket does not exist") || strings.Contains(errOut, s3test.SecretKey) {
		t.Fatalf("status %d, stderr %q", status, errOut)
	}
}

// parseRunFlags parses `run` flags into a Config as RunCommand does.
func parseRunFlags(t *testing.T, args ...string) (Config, error) {
	t.Helper()
	c := DefaultConfig()
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	c.RegisterFlags(fs)
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	return c, c.Validate()
}

func TestConfigStorageFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string // "" for valid
	}{
		{[]string{"--checkpoint-dir", "/var/lib/sluice"}, ""},
		{[]string{"--checkpoint-dir", "file:///var/lib/sluice"}, ""},
		{[]string{"--checkpoint-dir", "s3://bucket/prefix", "--s3-endpoint", "http://127.0.0.1:9000", "--s3-region", "eu-west-1", "--s3-path-style"}, ""},
		{[]string{"--checkpoint-dir", "s3://bucket"}, ""},
		{[]string{"--checkpoint-dir", ""}, "--checkpoint-dir must not be empty"},
		{[]string{"--checkpoint-dir", "gs://bucket/x"}, `--checkpoint-dir: invalid storage location "gs://bucket/x": unknown scheme "gs"`},
		{[]string{"--checkpoint-dir", "s3://bucket/a/../b"}, `".." segment`},
		{[]string{"--checkpoint-dir", "/data", "--s3-region", "eu-west-1", "--s3-path-style"}, `--s3-region, --s3-path-style given, but --checkpoint-dir "/data" is not an s3://bucket/prefix location`},
	} {
		c, err := parseRunFlags(t, tc.args...)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%q: %v", tc.args, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%q: err = %v, want %q", tc.args, err, tc.want)
		}
		if tc.want == "" && slices.Contains(tc.args, "--s3-path-style") && (!c.S3.PathStyle || c.S3.Region != "eu-west-1" || c.S3.Endpoint != "http://127.0.0.1:9000") {
			t.Errorf("%q: S3 options %+v", tc.args, c.S3)
		}
	}
}

// TestStartS3Storage: Start opens an s3:// checkpoint location before it
// connects to Kafka, and says what is wrong with it.
func TestStartS3Storage(t *testing.T) {
	s3test.UseCredentials(t)
	job := example.CountJob("j", "events", "counts")
	start := func(t *testing.T, args ...string) error {
		t.Helper()
		args = append(args, "--brokers", "127.0.0.1:1", "--connect-timeout", "2s", "--admin-addr", "", "--work-dir", t.TempDir())
		c, err := parseRunFlags(t, args...)
		if err != nil {
			t.Fatal(err)
		}
		p, err := Start(context.Background(), job, c, slog.New(slog.DiscardHandler))
		if err == nil {
			p.Close()
			t.Fatal("started without Kafka")
		}
		return err
	}
	t.Run("UnreachableEndpoint", func(t *testing.T) {
		err := start(t, "--checkpoint-dir", "s3://bucket/prefix", "--s3-endpoint", "http://127.0.0.1:1", "--s3-path-style")
		for _, w := range []string{"S3 endpoint http://127.0.0.1:1", "s3://bucket/prefix", "not reachable"} {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("error %q does not say %q", err, w)
			}
		}
	})
	t.Run("Server", func(t *testing.T) {
		srv := s3test.Start(t, s3test.Options{})
		srv.CreateBucket(t, "ckpt")
		// The storage opens (the conditional-write probe passes); then
		// Kafka is what fails.
		err := start(t, "--checkpoint-dir", "s3://ckpt/prod", "--s3-endpoint", srv.Endpoint, "--s3-path-style", "--s3-region", s3test.Region)
		if !strings.Contains(err.Error(), "cannot reach Kafka brokers") {
			t.Fatalf("err = %v", err)
		}
		err = start(t, "--checkpoint-dir", "s3://missing-bucket/prod", "--s3-endpoint", srv.Endpoint, "--s3-path-style")
		if !strings.Contains(err.Error(), "bucket missing-bucket does not exist") {
			t.Fatalf("err = %v", err)
		}
	})
}
