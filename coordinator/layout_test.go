package coordinator

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestLayoutNames(t *testing.T) {
	for _, tc := range []struct{ got, want string }{
		{TaskPrefix("counts", 3), "counts/tasks/3/"},
		{CheckpointPrefix("counts", 3, 12), "counts/tasks/3/chk-12/"},
		{MetadataName("counts", 3, 12), "counts/tasks/3/chk-12/_metadata"},
		{SharedPrefix("counts", 3), "counts/tasks/3/shared/"},
		{FileObjectName("counts", 3, FileRef{Object: "shared/a.sst"}), "counts/tasks/3/shared/a.sst"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
	if err := ValidateName(MetadataName("counts", 0, 1)); err != nil {
		t.Error(err)
	}
}

func TestLayoutParseCheckpointDir(t *testing.T) {
	for name, want := range map[string]int64{
		"chk-12/_metadata": 12, "chk-1/": 1, "chk-7": 7, "chk-9223372036854775807/x": 1<<63 - 1,
		"chk-0/_metadata": 0, "chk-012/_metadata": 0, "chk-+1/": 0, "chk--1/": 0, "chk-/": 0,
		"chk-1a/": 0, "shared/chk-1/": 0, "chk-99999999999999999999/": 0, "": 0,
	} {
		id, ok := ParseCheckpointDir(name)
		if ok != (want > 0) || id != want {
			t.Errorf("ParseCheckpointDir(%q) = %d, %v; want %d", name, id, ok, want)
		}
	}
}

func TestLayoutListCheckpointIDs(t *testing.T) {
	ctx := context.Background()
	st := NewMemStorage()
	for _, n := range []string{
		"j/tasks/1/chk-2/_metadata", "j/tasks/1/chk-10/_metadata", "j/tasks/1/chk-3/_metadata",
		"j/tasks/1/chk-11/MANIFEST",          // partial: no metadata
		"j/tasks/1/chk-012/_metadata",        // not a name Sluice writes
		"j/tasks/1/chk-4/sub/_metadata",      // not the metadata of chk-4
		"j/tasks/1/shared/chk-5/_metadata",   // in shared/
		"j/tasks/10/chk-20/_metadata",        // another task
		"j/tasks/1/chk-1/_metadata.tmp-copy", // not the metadata either
	} {
		storagePut(t, st, n, "x")
	}
	ids, err := ListCheckpointIDs(ctx, st, "j", 1)
	if err != nil {
		t.Fatal(err)
	}
	if want := []int64{10, 3, 2}; !slices.Equal(ids, want) {
		t.Fatalf("ids = %v, want %v", ids, want)
	}
	ids, err = ListCheckpointIDs(ctx, st, "j", 2)
	if err != nil || len(ids) != 0 {
		t.Fatalf("empty task: %v, %v", ids, err)
	}
}

func TestLayoutUploadDownload(t *testing.T) {
	ctx := context.Background()
	st := newTestLocalStorage(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "000012.sst")
	if err := os.WriteFile(src, []byte("sst content"), 0o644); err != nil {
		t.Fatal(err)
	}
	name := SharedPrefix("j", 0) + "000012.sst"
	if err := UploadFile(ctx, st, name, src); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "restore", "db", "000012.sst")
	if err := DownloadFile(ctx, st, name, dst); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(dst); err != nil || string(b) != "sst content" {
		t.Fatalf("downloaded %q, %v", b, err)
	}
	entries, _ := os.ReadDir(filepath.Dir(dst))
	if len(entries) != 1 {
		t.Fatalf("download left temporary files: %v", entries)
	}

	err := DownloadFile(ctx, st, name+"-missing", filepath.Join(dir, "missing"))
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("download missing: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("failed download created the file: %v", err)
	}
	if err := UploadFile(ctx, st, name, filepath.Join(dir, "nope")); err == nil || !strings.Contains(err.Error(), "nope") {
		t.Fatalf("upload missing file: %v", err)
	}
}
