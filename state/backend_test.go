package state

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestBatchEach(t *testing.T) {
	var b Batch
	b.Put([]byte("a"), []byte("1"))
	b.Delete([]byte("b"))
	b.Put([]byte(""), nil)
	b.Put([]byte("c"), []byte("33"))
	if b.Len() != 4 {
		t.Fatalf("Len = %d", b.Len())
	}
	var got []string
	_ = b.Each(func(k, v []byte, del bool) error {
		got = append(got, fmt.Sprintf("%s=%s/%v", k, v, del))
		return nil
	})
	want := []string{"a=1/false", "b=/true", "=/false", "c=33/false"}
	if !slices.Equal(got, want) {
		t.Fatalf("got %q, want %q", got, want)
	}
	stop := errors.New("stop")
	n := 0
	if err := b.Each(func(_, _ []byte, _ bool) error { n++; return stop }); err != stop || n != 1 {
		t.Fatalf("Each did not stop: %v after %d", err, n)
	}
}

func TestBackendBasics(t *testing.T) {
	for name, f := range factories(t) {
		t.Run(name, func(t *testing.T) {
			b := openBackend(t, f, t.TempDir())
			var batch Batch
			batch.Put([]byte("k1"), []byte("v1"))
			batch.Put([]byte("k2"), []byte("v2"))
			batch.Put([]byte("k2"), []byte("v2b")) // later op wins
			batch.Put([]byte("x"), []byte(""))
			batch.Put([]byte("gone"), []byte("1"))
			batch.Delete([]byte("gone"))
			if err := b.Apply(&batch); err != nil {
				t.Fatal(err)
			}
			v, ok, err := b.Get([]byte("k2"))
			if err != nil || !ok || string(v) != "v2b" {
				t.Fatalf("Get k2 = %q %v %v", v, ok, err)
			}
			v[0] = 'X' // a copy: must not change the store
			if v, _, _ := b.Get([]byte("k2")); string(v) != "v2b" {
				t.Fatalf("Get returned an alias: now %q", v)
			}
			if v, ok, err := b.Get([]byte("x")); err != nil || !ok || len(v) != 0 {
				t.Fatalf("empty value: %q %v %v", v, ok, err)
			}
			if _, ok, err := b.Get([]byte("gone")); err != nil || ok {
				t.Fatalf("deleted key found: %v %v", ok, err)
			}
			if got := dump(t, b.Scan, "k"); !maps.Equal(got, map[string]string{"k1": "v1", "k2": "v2b"}) {
				t.Fatalf("Scan k = %v", got)
			}
			if got := dump(t, b.Scan, ""); len(got) != 3 {
				t.Fatalf("Scan all = %v", got)
			}
			stop := errors.New("stop")
			if err := b.Scan(nil, func(_, _ []byte) error { return stop }); err != stop {
				t.Fatalf("Scan error = %v, want fn's error as is", err)
			}
			// fn may call back into the backend.
			if err := b.Scan([]byte("k"), func(k, _ []byte) error {
				_, _, err := b.Get(k)
				return err
			}); err != nil {
				t.Fatal(err)
			}
			if err := b.Close(); err != nil {
				t.Fatal(err)
			}
			if err := b.Close(); err != nil {
				t.Fatalf("second Close: %v", err)
			}
			if _, _, err := b.Get([]byte("k1")); !errors.Is(err, ErrClosed) {
				t.Fatalf("Get after Close: %v", err)
			}
			if err := b.Apply(&batch); !errors.Is(err, ErrClosed) {
				t.Fatalf("Apply after Close: %v", err)
			}
			if err := b.Scan(nil, func(_, _ []byte) error { return nil }); !errors.Is(err, ErrClosed) {
				t.Fatalf("Scan after Close: %v", err)
			}
			if _, err := b.Checkpoint(filepath.Join(t.TempDir(), "c")); !errors.Is(err, ErrClosed) {
				t.Fatalf("Checkpoint after Close: %v", err)
			}
		})
	}
}

func TestPrefixEnd(t *testing.T) {
	for _, c := range []struct{ in, want []byte }{
		{nil, nil},
		{[]byte{0xff, 0xff}, nil},
		{[]byte("ab"), []byte("ac")},
		{[]byte{1, 0xff}, []byte{2}},
	} {
		if got := prefixEnd(c.in); string(got) != string(c.want) {
			t.Errorf("prefixEnd(%x) = %x, want %x", c.in, got, c.want)
		}
	}
}

func TestScanPrefixFF(t *testing.T) {
	for name, f := range factories(t) {
		t.Run(name, func(t *testing.T) {
			b := openBackend(t, f, t.TempDir())
			var batch Batch
			for _, k := range []string{"\xfe", "\xff", "\xff\x00", "\xff\xff", "\xff\xff\x01"} {
				batch.Put([]byte(k), []byte("v"))
			}
			if err := b.Apply(&batch); err != nil {
				t.Fatal(err)
			}
			if got := dump(t, b.Scan, "\xff\xff"); len(got) != 2 {
				t.Fatalf("Scan 0xffff = %q", slices.Sorted(maps.Keys(got)))
			}
		})
	}
}

// TestCheckpointRestore checks the snapshot contract: the listed files,
// copied to a fresh directory, open to the same content, and later writes
// do not leak into an earlier checkpoint.
func TestCheckpointRestore(t *testing.T) {
	for name, f := range factories(t) {
		t.Run(name, func(t *testing.T) {
			b := openBackend(t, f, filepath.Join(t.TempDir(), "live"))
			want := map[string]string{}
			var batch Batch
			for i := range 2000 {
				k, v := fmt.Sprintf("key-%05d", i), strings.Repeat(fmt.Sprint(i), 10)
				batch.Put([]byte(k), []byte(v))
				want[k] = v
			}
			if err := b.Apply(&batch); err != nil {
				t.Fatal(err)
			}
			chk := filepath.Join(t.TempDir(), "chk-1")
			files, err := b.Checkpoint(chk)
			if err != nil {
				t.Fatal(err)
			}
			if len(files) == 0 || !slices.IsSorted(files) {
				t.Fatalf("files %q: want a sorted non-empty list", files)
			}
			onDisk, err := listFiles(chk)
			if err != nil || !slices.Equal(onDisk, files) {
				t.Fatalf("files %q, on disk %q (%v)", files, onDisk, err)
			}
			if _, err := b.Checkpoint(chk); err == nil {
				t.Fatal("Checkpoint into an existing dir succeeded")
			}

			var later Batch
			later.Put([]byte("key-00001"), []byte("changed"))
			later.Delete([]byte("key-00002"))
			later.Put([]byte("new"), []byte("1"))
			if err := b.Apply(&later); err != nil {
				t.Fatal(err)
			}

			restored := filepath.Join(t.TempDir(), "restored")
			copyFiles(t, chk, restored, files)
			r := openBackend(t, f, restored)
			if got := dump(t, r.Scan, ""); !maps.Equal(got, want) {
				t.Fatalf("restored %d entries, want %d", len(got), len(want))
			}
			// The restored store is a working store.
			if err := r.Apply(&later); err != nil {
				t.Fatal(err)
			}
			if got, _, _ := r.Get([]byte("key-00001")); string(got) != "changed" {
				t.Fatalf("restored store after apply: %q", got)
			}
		})
	}
}

func TestEmptyCheckpoint(t *testing.T) {
	for name, f := range factories(t) {
		t.Run(name, func(t *testing.T) {
			b := openBackend(t, f, filepath.Join(t.TempDir(), "live"))
			chk := filepath.Join(t.TempDir(), "a", "b", "chk")
			files, err := b.Checkpoint(chk)
			if err != nil {
				t.Fatal(err)
			}
			restored := filepath.Join(t.TempDir(), "r")
			copyFiles(t, chk, restored, files)
			if got := dump(t, openBackend(t, f, restored).Scan, ""); len(got) != 0 {
				t.Fatalf("restored empty store holds %v", got)
			}
		})
	}
}

func TestMemoryWithoutDir(t *testing.T) {
	b := openBackend(t, NewMemoryFactory(), "")
	var batch Batch
	batch.Put([]byte("k"), []byte("v"))
	if err := b.Apply(&batch); err != nil {
		t.Fatal(err)
	}
	if v, ok, err := b.Get([]byte("k")); err != nil || !ok || string(v) != "v" {
		t.Fatalf("Get = %q %v %v", v, ok, err)
	}
}

// TestMemorySnapshotCorrupt: every truncation and every flipped bit of a
// snapshot is an error on Open, never a panic or a silently wrong state.
func TestMemorySnapshotCorrupt(t *testing.T) {
	f := NewMemoryFactory()
	b := openBackend(t, f, "")
	var batch Batch
	for i := range 20 {
		batch.Put(fmt.Appendf(nil, "k%02d", i), fmt.Appendf(nil, "value %d", i))
	}
	if err := b.Apply(&batch); err != nil {
		t.Fatal(err)
	}
	chk := filepath.Join(t.TempDir(), "chk")
	if _, err := b.Checkpoint(chk); err != nil {
		t.Fatal(err)
	}
	good, err := os.ReadFile(filepath.Join(chk, memoryFile))
	if err != nil {
		t.Fatal(err)
	}
	try := func(data []byte) error {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, memoryFile), data, 0o644); err != nil {
			t.Fatal(err)
		}
		b, err := f.Open(dir)
		if err == nil {
			_ = b.Close()
		}
		return err
	}
	if err := try(good); err != nil {
		t.Fatalf("good snapshot: %v", err)
	}
	for n := range len(good) {
		if err := try(good[:n]); err == nil {
			t.Fatalf("snapshot truncated to %d bytes opened", n)
		}
	}
	for i := range good {
		bad := slices.Clone(good)
		bad[i] ^= 0x10
		if err := try(bad); err == nil {
			t.Fatalf("snapshot with byte %d flipped opened", i)
		}
	}
}

func TestPebbleShareableNames(t *testing.T) {
	f := NewPebbleFactory(1 << 20)
	defer f.Close()
	for name, want := range map[string]bool{
		"000012.sst":                             true,
		"000007.blob":                            true,
		"12.sst":                                 true,
		".sst":                                   false,
		"a12.sst":                                false,
		"dir/12.sst":                             false,
		"000012.log":                             false,
		"MANIFEST-000001":                        false,
		"OPTIONS-000003":                         false,
		"CURRENT":                                false,
		"marker.format-version.000001.024":       false,
		"marker.manifest.000001.MANIFEST-000001": false,
		"000012.sst.tmp":                         false,
	} {
		if got := f.Shareable(name); got != want {
			t.Errorf("Shareable(%q) = %v, want %v", name, got, want)
		}
	}
	if NewMemoryFactory().Shareable(memoryFile) {
		t.Error("memory snapshot is shareable")
	}
}

// TestPebbleIncremental: data that did not change between two checkpoints
// is in the same .sst files in both, every .sst is classified shareable and
// everything else not, and a restore that takes the shared files from the
// first checkpoint's copy (as an incremental upload stores them) works.
func TestPebbleIncremental(t *testing.T) {
	f := NewPebbleFactory(8 << 20)
	defer f.Close()
	b := openBackend(t, f, filepath.Join(t.TempDir(), "live"))
	want := map[string]string{}
	apply := func(from, to int, tag string) {
		var batch Batch
		for i := from; i < to; i++ {
			k, v := fmt.Sprintf("key-%06d", i), fmt.Sprintf("%s-%d", tag, i)
			batch.Put([]byte(k), []byte(v))
			want[k] = v
		}
		if err := b.Apply(&batch); err != nil {
			t.Fatal(err)
		}
	}
	root := t.TempDir()
	apply(0, 20000, "a")
	files1, err := b.Checkpoint(filepath.Join(root, "chk-1"))
	if err != nil {
		t.Fatal(err)
	}
	apply(20000, 20100, "b")
	files2, err := b.Checkpoint(filepath.Join(root, "chk-2"))
	if err != nil {
		t.Fatal(err)
	}
	files3, err := b.Checkpoint(filepath.Join(root, "chk-3"))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("chk-1: %q", files1)
	t.Logf("chk-2: %q", files2)
	t.Logf("chk-3: %q", files3)

	ssts := func(files []string) []string {
		var out []string
		for _, n := range files {
			if f.Shareable(n) {
				out = append(out, n)
			} else if strings.HasSuffix(n, ".sst") || strings.HasSuffix(n, ".blob") {
				t.Errorf("%q not shareable", n)
			}
		}
		return out
	}
	shared1, shared2 := ssts(files1), ssts(files2)
	if len(shared1) == 0 {
		t.Fatal("first checkpoint has no .sst")
	}
	var common []string
	for _, n := range shared2 {
		if slices.Contains(shared1, n) {
			common = append(common, n)
		}
	}
	if len(common) == 0 {
		t.Fatalf("no .sst shared between checkpoints: %q / %q", shared1, shared2)
	}
	if len(common) == len(shared2) {
		t.Fatalf("second checkpoint has no new .sst for its new data: %q", shared2)
	}
	if shared3 := ssts(files3); !slices.Equal(shared3, shared2) {
		t.Fatalf("checkpoint without changes has other .sst files: %q, before %q", shared3, shared2)
	}
	for _, n := range files2 {
		if !f.Shareable(n) && !(strings.HasSuffix(n, ".log") || strings.HasPrefix(n, "MANIFEST-") || strings.HasPrefix(n, "OPTIONS-") || strings.HasPrefix(n, "marker.")) {
			t.Errorf("unexpected checkpoint file %q", n)
		}
	}

	// Restore chk-2 taking the files it shares with chk-1 from chk-1.
	restored := filepath.Join(t.TempDir(), "restored")
	for _, n := range files2 {
		src := filepath.Join(root, "chk-2", n)
		if slices.Contains(common, n) {
			src = filepath.Join(root, "chk-1", n)
		}
		copyFile(t, src, filepath.Join(restored, n))
	}
	if got := dump(t, openBackend(t, f, restored).Scan, ""); !maps.Equal(got, want) {
		t.Fatalf("restored %d entries, want %d", len(got), len(want))
	}
}

func TestPebbleFactoryClose(t *testing.T) {
	f := NewPebbleFactory(1 << 20)
	b, err := f.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	// Backends opened before keep working: they hold their own cache ref.
	var batch Batch
	batch.Put([]byte("k"), []byte("v"))
	if err := b.Apply(&batch); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := b.Get([]byte("k")); err != nil || !ok {
		t.Fatalf("Get after factory Close: %v %v", ok, err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Open(t.TempDir()); !errors.Is(err, ErrClosed) {
		t.Fatalf("Open after Close: %v", err)
	}
	if err := f.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}
