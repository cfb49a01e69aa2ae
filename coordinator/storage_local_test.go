package coordinator

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

func newTestLocalStorage(t *testing.T) *LocalStorage {
	t.Helper()
	s, err := NewLocalStorage(filepath.Join(t.TempDir(), "checkpoints"))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestLocalStorage(t *testing.T) {
	storageContract(t, func(t *testing.T) Storage { return newTestLocalStorage(t) })
}

func TestLocalStorageNotWritable(t *testing.T) {
	// Tests run as root, which chmod does not stop: put the root below a
	// regular file instead.
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(file, "checkpoints")
	_, err := NewLocalStorage(root)
	if err == nil || !strings.Contains(err.Error(), "checkpoint directory "+root+" is not writable") {
		t.Fatalf("got %v, want an error naming %s as not writable", err, root)
	}
	if _, err := NewLocalStorage(""); err == nil {
		t.Fatal("empty root accepted")
	}
}

func TestLocalStorageString(t *testing.T) {
	dir := t.TempDir()
	s, err := NewLocalStorage(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := s.String(), "file://"+filepath.ToSlash(dir); got != want {
		t.Fatalf("String() = %q, want %q", got, want)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatalf("probe left %v behind", entries)
	}
}

func TestLocalStorageListSkipsTempFiles(t *testing.T) {
	s := newTestLocalStorage(t)
	storagePut(t, s, "j/tasks/0/chk-1/_metadata", "m")
	// What a crashed Put or Create leaves behind.
	stray := filepath.Join(s.root, "j", "tasks", "0", "chk-1", tmpPrefix+"123")
	if err := os.WriteFile(stray, []byte("partial"), 0o644); err != nil {
		t.Fatal(err)
	}
	got, err := s.List(context.Background(), "j/")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, []string{"j/tasks/0/chk-1/_metadata"}) {
		t.Fatalf("List = %q", got)
	}
}

func TestLocalStorageDeleteRemovesEmptyDirs(t *testing.T) {
	ctx := context.Background()
	s := newTestLocalStorage(t)
	storagePut(t, s, "j/tasks/0/chk-1/_metadata", "m")
	storagePut(t, s, "j/tasks/0/chk-1/MANIFEST", "x")
	storagePut(t, s, "j/tasks/0/shared/a.sst", "x")
	exists := func(rel string) bool {
		_, err := os.Stat(filepath.Join(s.root, filepath.FromSlash(rel)))
		return err == nil
	}
	if err := s.Delete(ctx, "j/tasks/0/chk-1/_metadata"); err != nil {
		t.Fatal(err)
	}
	if !exists("j/tasks/0/chk-1") {
		t.Fatal("non-empty folder removed")
	}
	if err := s.Delete(ctx, "j/tasks/0/chk-1/MANIFEST"); err != nil {
		t.Fatal(err)
	}
	if exists("j/tasks/0/chk-1") || !exists("j/tasks/0/shared") {
		t.Fatal("want chk-1 removed and shared kept")
	}
	if err := s.Delete(ctx, "j/tasks/0/shared/a.sst"); err != nil {
		t.Fatal(err)
	}
	if exists("j") || !exists("") {
		t.Fatal("want every empty folder removed up to, not including, the root")
	}
	// Deleting a folder name is a no-op: it is not an object.
	storagePut(t, s, "k/obj", "x")
	if err := s.Delete(ctx, "k"); err != nil || !exists("k/obj") {
		t.Fatalf("Delete(folder) = %v", err)
	}
}

// Delete removes folders left empty while others write into them: a write
// must retry rather than fail when its folder disappears.
func TestLocalStoragePutDeleteRace(t *testing.T) {
	ctx := context.Background()
	s := newTestLocalStorage(t)
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 100 {
				name := fmt.Sprintf("j/tasks/0/chk-%d/f%d", i%3, g)
				var err error
				if g%2 == 0 {
					err = s.Put(ctx, name, strings.NewReader("x"))
				} else {
					err = s.Create(ctx, name, []byte("x"))
				}
				if err != nil && !errors.Is(err, ErrExists) {
					t.Error(err)
					return
				}
				if err := s.Delete(ctx, name); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if names, err := s.List(ctx, ""); err != nil || len(names) != 0 {
		t.Fatalf("List = %q, %v", names, err)
	}
}
