package coordinator

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
)

// retainFixture writes complete checkpoints 1, 2, 3, 5, 6 and 7 of task 1 of
// job "counts" (checkpoint i references shared/base.sst, shared/s<i>.sst,
// shared/s<i+1>.sst and chk-<i>/MANIFEST; 7 is a claim repeating 6's
// files), partial folders chk-4 (older than the kept ones) and chk-8
// (newer), an unreferenced shared file, and objects that are not the
// task's checkpoints. It returns the checkpoints by id.
func retainFixture(t *testing.T, st Storage) map[int64]*Checkpoint {
	t.Helper()
	ctx := context.Background()
	const job, task = "counts", int32(1)
	put := func(rel string) { storagePut(t, st, TaskPrefix(job, task)+rel, rel) }
	cps := make(map[int64]*Checkpoint)
	for _, id := range []int64{1, 2, 3, 5, 6, 7} {
		c := &Checkpoint{Job: job, Task: task, ID: id, Kind: KindCheckpoint, Owner: "a"}
		if id == 7 {
			c.Kind, c.Owner, c.Files = KindClaim, "b", cps[6].Files
		} else {
			for _, obj := range []string{
				"shared/base.sst",
				fmt.Sprintf("shared/s%d.sst", id),
				fmt.Sprintf("shared/s%d.sst", id+1),
				fmt.Sprintf("chk-%d/MANIFEST", id),
			} {
				c.Files = append(c.Files, FileRef{Name: obj[strings.LastIndex(obj, "/")+1:], Object: obj})
				put(obj)
			}
		}
		if err := st.Create(ctx, MetadataName(job, task, id), mustEncodeCheckpoint(t, c)); err != nil {
			t.Fatal(err)
		}
		cps[id] = c
	}
	for _, rel := range []string{"chk-4/MANIFEST", "chk-4/x.sst", "chk-8/MANIFEST", "shared/unref.sst", "import-marker"} {
		put(rel)
	}
	storagePut(t, st, "counts/tasks/10/chk-1/MANIFEST", "other task")
	storagePut(t, st, "counts/tasks/10/shared/s1.sst", "other task")
	return cps
}

func TestRetain(t *testing.T) {
	for name, newStorage := range map[string]func(t *testing.T) Storage{
		"mem":   func(*testing.T) Storage { return NewMemStorage() },
		"local": func(t *testing.T) Storage { return newTestLocalStorage(t) },
	} {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			st := newStorage(t)
			cps := retainFixture(t, st)
			keep := []*Checkpoint{cps[7], cps[3], cps[5]}
			if err := Retain(ctx, st, "counts", 1, keep); err != nil {
				t.Fatal(err)
			}
			got, err := st.List(ctx, "")
			if err != nil {
				t.Fatal(err)
			}
			want := []string{
				"counts/tasks/1/chk-3/MANIFEST",
				"counts/tasks/1/chk-3/_metadata",
				"counts/tasks/1/chk-5/MANIFEST",
				"counts/tasks/1/chk-5/_metadata",
				"counts/tasks/1/chk-6/MANIFEST", // referenced by the claim 7
				"counts/tasks/1/chk-7/_metadata",
				"counts/tasks/1/chk-8/MANIFEST", // newer than the kept: may be uploading
				"counts/tasks/1/import-marker",  // not ours to delete
				"counts/tasks/1/shared/base.sst",
				"counts/tasks/1/shared/s3.sst",
				"counts/tasks/1/shared/s4.sst",
				"counts/tasks/1/shared/s5.sst",
				"counts/tasks/1/shared/s6.sst",
				"counts/tasks/1/shared/s7.sst",
				"counts/tasks/10/chk-1/MANIFEST",
				"counts/tasks/10/shared/s1.sst",
			}
			if !slices.Equal(got, want) {
				t.Fatalf("left:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
			ids, err := ListCheckpointIDs(ctx, st, "counts", 1)
			if err != nil || !slices.Equal(ids, []int64{7, 5, 3}) {
				t.Fatalf("ids %v, %v", ids, err)
			}
			// Idempotent.
			if err := Retain(ctx, st, "counts", 1, keep); err != nil {
				t.Fatal(err)
			}
			if again, _ := st.List(ctx, ""); !slices.Equal(again, want) {
				t.Fatalf("second Retain changed storage: %q", again)
			}
		})
	}
}

// A failed metadata delete keeps that checkpoint's files and all shared
// files, so no complete-looking checkpoint loses its files; everything else
// goes on, and the error names what failed.
func TestRetainDeleteFailure(t *testing.T) {
	ctx := context.Background()
	mem := NewMemStorage()
	cps := retainFixture(t, mem)
	st := NewFaultyStorage(mem)
	failing := MetadataName("counts", 1, 2)
	st.SetFault(func(op Op, name string) error {
		if op == OpDelete && (name == failing || name == "counts/tasks/1/chk-4/x.sst") {
			return errors.New("injected")
		}
		return nil
	})
	err := Retain(ctx, st, "counts", 1, []*Checkpoint{cps[3], cps[5], cps[7]})
	if err == nil || !strings.Contains(err.Error(), failing) || !strings.Contains(err.Error(), "chk-4/x.sst") {
		t.Fatalf("got %v, want an error naming both failed deletes", err)
	}
	names := mem.Names()
	has := func(rel string) bool { return slices.Contains(names, "counts/tasks/1/"+rel) }
	for _, rel := range []string{"chk-2/_metadata", "chk-2/MANIFEST", "chk-4/x.sst", "shared/s1.sst", "shared/unref.sst"} {
		if !has(rel) {
			t.Errorf("%s deleted", rel)
		}
	}
	for _, rel := range []string{"chk-1/_metadata", "chk-1/MANIFEST", "chk-4/MANIFEST", "chk-6/_metadata"} {
		if has(rel) {
			t.Errorf("%s not deleted", rel)
		}
	}
}

func TestRetainRefusesBadInput(t *testing.T) {
	ctx := context.Background()
	st := NewMemStorage()
	cps := retainFixture(t, st)
	before := st.Names()
	for name, keep := range map[string][]*Checkpoint{
		"none":       nil,
		"nil":        {cps[7], nil},
		"other task": {{Job: "counts", Task: 2, ID: 7}},
		"other job":  {{Job: "sums", Task: 1, ID: 7}},
	} {
		if err := Retain(ctx, st, "counts", 1, keep); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if !slices.Equal(st.Names(), before) {
		t.Fatal("refused Retain deleted objects")
	}
}
