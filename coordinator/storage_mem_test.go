package coordinator

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"testing"
)

// storageContract checks the behaviour every Storage must have.
func storageContract(t *testing.T, newStorage func(t *testing.T) Storage) {
	ctx := context.Background()

	t.Run("PutGetReplace", func(t *testing.T) {
		st := newStorage(t)
		if err := st.Put(ctx, "a/b/c", strings.NewReader("one")); err != nil {
			t.Fatal(err)
		}
		if got := storageRead(t, st, "a/b/c"); got != "one" {
			t.Fatalf("got %q", got)
		}
		if err := st.Put(ctx, "a/b/c", strings.NewReader("two")); err != nil {
			t.Fatal(err)
		}
		if got := storageRead(t, st, "a/b/c"); got != "two" {
			t.Fatalf("after replace got %q", got)
		}
	})

	t.Run("GetMissing", func(t *testing.T) {
		st := newStorage(t)
		if _, err := st.Get(ctx, "no/such"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("got %v, want ErrNotFound", err)
		}
		storagePut(t, st, "dir/obj", "x")
		// A prefix is not an object, nor is a name below an object.
		for _, name := range []string{"dir", "dir/obj/below"} {
			if _, err := st.Get(ctx, name); !errors.Is(err, ErrNotFound) {
				t.Fatalf("Get(%q) = %v, want ErrNotFound", name, err)
			}
		}
	})

	t.Run("CreateExists", func(t *testing.T) {
		st := newStorage(t)
		if err := st.Create(ctx, "x/_metadata", []byte("first")); err != nil {
			t.Fatal(err)
		}
		if err := st.Create(ctx, "x/_metadata", []byte("second")); !errors.Is(err, ErrExists) {
			t.Fatalf("second create: %v, want ErrExists", err)
		}
		if got := storageRead(t, st, "x/_metadata"); got != "first" {
			t.Fatalf("got %q", got)
		}
	})

	t.Run("ListPrefixSorted", func(t *testing.T) {
		st := newStorage(t)
		for _, n := range []string{"j/tasks/1/chk-2/_metadata", "j/tasks/1/shared/f", "j/tasks/10/chk-1/_metadata",
			"j/tasks/1/chk-10/x", "a.b", "a/b", "a-c"} {
			storagePut(t, st, n, n)
		}
		for _, tc := range []struct {
			prefix string
			want   []string
		}{
			{"j/tasks/1/", []string{"j/tasks/1/chk-10/x", "j/tasks/1/chk-2/_metadata", "j/tasks/1/shared/f"}},
			{"j/tasks/1/chk-", []string{"j/tasks/1/chk-10/x", "j/tasks/1/chk-2/_metadata"}},
			{"j/tasks/1", []string{"j/tasks/1/chk-10/x", "j/tasks/1/chk-2/_metadata", "j/tasks/1/shared/f", "j/tasks/10/chk-1/_metadata"}},
			{"a", []string{"a-c", "a.b", "a/b"}},
			{"", []string{"a-c", "a.b", "a/b", "j/tasks/1/chk-10/x", "j/tasks/1/chk-2/_metadata", "j/tasks/1/shared/f", "j/tasks/10/chk-1/_metadata"}},
			{"none/", nil},
			{"a/b/", nil},
		} {
			got, err := st.List(ctx, tc.prefix)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("List(%q) = %q, want %q", tc.prefix, got, tc.want)
			}
		}
	})

	t.Run("Delete", func(t *testing.T) {
		st := newStorage(t)
		storagePut(t, st, "d/e", "x")
		for range 2 { // deleting a missing object is fine
			if err := st.Delete(ctx, "d/e"); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := st.Get(ctx, "d/e"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("got %v after delete", err)
		}
		if err := st.Delete(ctx, "never/was"); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("InvalidNames", func(t *testing.T) {
		st := newStorage(t)
		for _, name := range []string{"", "/abs", "a/../b", "..", "a//b", "a/", "./a", `a\b`, "a/" + tmpPrefix + "x"} {
			errs := []error{
				st.Put(ctx, name, strings.NewReader("x")),
				st.Create(ctx, name, []byte("x")),
				st.Delete(ctx, name),
			}
			_, err := st.Get(ctx, name)
			errs = append(errs, err)
			for i, err := range errs {
				if !errors.Is(err, ErrInvalidName) || !strings.Contains(err.Error(), fmt.Sprintf("%q", name)) {
					t.Errorf("op %d on %q: %v, want ErrInvalidName naming it", i, name, err)
				}
			}
		}
		if _, err := st.List(ctx, "../"); !errors.Is(err, ErrInvalidName) && err != nil {
			t.Errorf("List(../): %v", err)
		}
	})

	t.Run("CanceledContext", func(t *testing.T) {
		st := newStorage(t)
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if err := st.Put(cctx, "p", strings.NewReader("x")); !errors.Is(err, context.Canceled) {
			t.Errorf("Put: %v", err)
		}
		if err := st.Create(cctx, "c", []byte("x")); !errors.Is(err, context.Canceled) {
			t.Errorf("Create: %v", err)
		}
		if _, err := st.List(cctx, ""); !errors.Is(err, context.Canceled) {
			t.Errorf("List: %v", err)
		}
		if names, _ := st.List(ctx, ""); len(names) != 0 {
			t.Errorf("canceled writes left %q", names)
		}
	})

	t.Run("RacingCreate", func(t *testing.T) {
		st := newStorage(t)
		storageRacingCreate(t, st)
	})
}

// storageRacingCreate races two owners creating each of 50 names, with a
// reader polling each name: exactly one create wins, the loser gets
// ErrExists, and a reader only ever sees nothing or the winner's whole
// content.
func storageRacingCreate(t *testing.T, st Storage) {
	ctx := context.Background()
	const pairs = 50
	content := func(i, owner int) []byte {
		// Large enough that a partly written object would be visible.
		return bytes.Repeat([]byte(fmt.Sprintf("owner %d of %d;", owner, i)), 4096)
	}
	var wg sync.WaitGroup
	results := make([][2]error, pairs)
	for i := range pairs {
		name := fmt.Sprintf("job/tasks/%d/chk-1/_metadata", i)
		for owner := range 2 {
			wg.Go(func() { results[i][owner] = st.Create(ctx, name, content(i, owner)) })
		}
		wg.Go(func() {
			for range 20 {
				rc, err := st.Get(ctx, name)
				if errors.Is(err, ErrNotFound) {
					continue
				}
				if err != nil {
					t.Errorf("reader: %v", err)
					return
				}
				b, err := io.ReadAll(rc)
				rc.Close()
				if err != nil || !(bytes.Equal(b, content(i, 0)) || bytes.Equal(b, content(i, 1))) {
					t.Errorf("reader of %s saw %d bytes, err %v: not a whole object", name, len(b), err)
					return
				}
			}
		})
	}
	wg.Wait()
	for i, r := range results {
		name := fmt.Sprintf("job/tasks/%d/chk-1/_metadata", i)
		var winner int
		switch {
		case r[0] == nil && errors.Is(r[1], ErrExists):
			winner = 0
		case r[1] == nil && errors.Is(r[0], ErrExists):
			winner = 1
		default:
			t.Fatalf("pair %d: results %v, want exactly one winner and one ErrExists", i, r)
		}
		if got := storageRead(t, st, name); got != string(content(i, winner)) {
			t.Fatalf("pair %d: content is not the winner's (%d bytes)", i, len(got))
		}
	}
	names, err := st.List(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(names) != pairs {
		t.Fatalf("%d objects listed, want %d: %q", len(names), pairs, names)
	}
}

func storagePut(t *testing.T, st Storage, name, content string) {
	t.Helper()
	if err := st.Put(context.Background(), name, strings.NewReader(content)); err != nil {
		t.Fatal(err)
	}
}

func storageRead(t *testing.T, st Storage, name string) string {
	t.Helper()
	rc, err := st.Get(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestMemStorage(t *testing.T) {
	storageContract(t, func(*testing.T) Storage { return NewMemStorage() })
}

func TestMemStorageNames(t *testing.T) {
	m := NewMemStorage()
	storagePut(t, m, "b", "1")
	storagePut(t, m, "a/x", "2")
	if got := m.Names(); !slices.Equal(got, []string{"a/x", "b"}) {
		t.Fatalf("Names() = %q", got)
	}
	// Create keeps its own copy of the caller's slice.
	data := []byte("orig")
	if err := m.Create(context.Background(), "c", data); err != nil {
		t.Fatal(err)
	}
	data[0] = 'X'
	if got := storageRead(t, m, "c"); got != "orig" {
		t.Fatalf("stored object changed with caller's slice: %q", got)
	}
}
