package state

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

func mustGet(t *testing.T, s *Store, key string) (string, bool) {
	t.Helper()
	v, ok, err := s.Get([]byte(key))
	if err != nil {
		t.Fatal(err)
	}
	return string(v), ok
}

func TestStoreLayering(t *testing.T) {
	for name, f := range factories(t) {
		t.Run(name, func(t *testing.T) {
			s := NewStore(openBackend(t, f, t.TempDir()))
			var base Batch
			for _, k := range []string{"a", "b", "c", "d", "e"} {
				base.Put([]byte(k), []byte(k+"0"))
			}
			if err := s.Backend().Apply(&base); err != nil {
				t.Fatal(err)
			}
			s.Put([]byte("a"), []byte("a1"))
			s.Delete([]byte("b"))
			s.Put([]byte("x"), []byte("x1"))
			s1 := s.Seal()
			s.Put([]byte("b"), []byte("b2")) // newer put over an older delete
			s.Delete([]byte("c"))
			s.Put([]byte("x"), []byte("x2"))
			s2 := s.Seal()
			s.Put([]byte("d"), []byte("d3"))
			s.Delete([]byte("x"))
			s.Put([]byte("y"), []byte("y3"))
			s.Delete([]byte("y"))
			s.Put([]byte("y"), []byte("y3b")) // put after delete in the same buffer
			s.Delete([]byte("zz"))            // delete of a key that never was
			if s.SealedCount() != 2 || s1.Len() != 3 || s2.Len() != 3 {
				t.Fatalf("SealedCount %d, Len %d %d", s.SealedCount(), s1.Len(), s2.Len())
			}
			want := map[string]string{"a": "a1", "b": "b2", "d": "d3", "e": "e0", "y": "y3b"}
			check := func(stage string) {
				t.Helper()
				for _, k := range []string{"a", "b", "c", "d", "e", "x", "y", "zz"} {
					v, ok := mustGet(t, s, k)
					if w, wok := want[k]; ok != wok || v != w {
						t.Fatalf("%s: Get(%q) = %q %v, want %q %v", stage, k, v, ok, w, wok)
					}
				}
				if got := dump(t, s.Scan, ""); !maps.Equal(got, want) {
					t.Fatalf("%s: Scan = %v, want %v", stage, got, want)
				}
			}
			check("buffered")
			if _, err := s.Persist(s1, filepath.Join(t.TempDir(), "1")); err != nil {
				t.Fatal(err)
			}
			check("s1 persisted")
			if _, err := s.Persist(s2, filepath.Join(t.TempDir(), "2")); err != nil {
				t.Fatal(err)
			}
			check("s2 persisted")
			if s.SealedCount() != 0 {
				t.Fatalf("SealedCount %d after persisting all", s.SealedCount())
			}
		})
	}
}

func TestStoreGetReturnsCopy(t *testing.T) {
	s := NewStore(openBackend(t, NewMemoryFactory(), ""))
	s.Put([]byte("k"), []byte("abc"))
	v, _, _ := s.Get([]byte("k"))
	s.Put([]byte("k"), []byte("xyz")) // reuses the live value's memory
	if string(v) != "abc" {
		t.Fatalf("earlier Get result changed to %q", v)
	}
	v[0] = 'Q'
	s.Seal()
	v, _, _ = s.Get([]byte("k"))
	v[0] = 'Q'
	if got, _ := mustGet(t, s, "k"); got != "xyz" {
		t.Fatalf("modifying Get's result changed the store: %q", got)
	}
	key := []byte("k2")
	s.Put(key, []byte("v"))
	key[0] = 'X'
	if _, ok := mustGet(t, s, "k2"); !ok {
		t.Fatal("Put did not copy its key")
	}
}

func TestPersistOrder(t *testing.T) {
	s := NewStore(openBackend(t, NewMemoryFactory(), ""))
	if _, err := s.Persist(&Sealed{}, filepath.Join(t.TempDir(), "x")); !errors.Is(err, ErrNotOldest) {
		t.Fatalf("Persist with nothing sealed: %v", err)
	}
	s.Put([]byte("k"), []byte("1"))
	s1 := s.Seal()
	s.Put([]byte("k"), []byte("2"))
	s2 := s.Seal()
	dir := t.TempDir()
	if _, err := s.Persist(s2, filepath.Join(dir, "a")); !errors.Is(err, ErrNotOldest) {
		t.Fatalf("Persist of the newer buffer first: %v", err)
	}
	if v, _ := mustGet(t, s, "k"); v != "2" || s.SealedCount() != 2 {
		t.Fatalf("refused Persist changed the store: %q, %d sealed", v, s.SealedCount())
	}
	if _, err := s.Persist(s1, filepath.Join(dir, "b")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Persist(s1, filepath.Join(dir, "c")); !errors.Is(err, ErrNotOldest) {
		t.Fatalf("second Persist of the same buffer: %v", err)
	}
	if _, err := s.Persist(s2, filepath.Join(dir, "d")); err != nil {
		t.Fatal(err)
	}
	if v, _, _ := s.Backend().Get([]byte("k")); string(v) != "2" {
		t.Fatalf("backend holds %q, want the newest value", v)
	}
}

// failingBackend fails Apply while fail is set.
type failingBackend struct {
	Backend
	fail bool
}

func (f *failingBackend) Apply(b *Batch) error {
	if f.fail {
		return errors.New("disk full")
	}
	return f.Backend.Apply(b)
}

func TestPersistApplyFailureKeepsBuffer(t *testing.T) {
	fb := &failingBackend{Backend: openBackend(t, NewMemoryFactory(), ""), fail: true}
	s := NewStore(fb)
	s.Put([]byte("k"), []byte("v"))
	sealed := s.Seal()
	if _, err := s.Persist(sealed, filepath.Join(t.TempDir(), "a")); err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("Persist = %v, want the apply error", err)
	}
	if v, ok := mustGet(t, s, "k"); !ok || v != "v" || s.SealedCount() != 1 {
		t.Fatalf("after failed Persist: %q %v, %d sealed", v, ok, s.SealedCount())
	}
	fb.fail = false
	if _, err := s.Persist(sealed, filepath.Join(t.TempDir(), "b")); err != nil {
		t.Fatal(err)
	}
	if v, ok := mustGet(t, s, "k"); !ok || v != "v" || s.SealedCount() != 0 {
		t.Fatalf("after retried Persist: %q %v, %d sealed", v, ok, s.SealedCount())
	}
}

func TestStoreClose(t *testing.T) {
	s := NewStore(openBackend(t, factories(t)["pebble"], t.TempDir()))
	s.Put([]byte("k"), []byte("v"))
	sealed := s.Seal()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := s.Persist(sealed, filepath.Join(t.TempDir(), "c")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Persist after Close: %v", err)
	}
	if _, _, err := s.Get([]byte("other")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Get after Close: %v", err)
	}
}

func TestScanWithWritesInCallback(t *testing.T) {
	s := NewStore(openBackend(t, NewMemoryFactory(), ""))
	var base Batch
	base.Put([]byte("k1"), []byte("backend"))
	if err := s.Backend().Apply(&base); err != nil {
		t.Fatal(err)
	}
	s.Put([]byte("k2"), []byte("live-long-value"))
	s.Put([]byte("k3"), []byte("live"))
	got := map[string]string{}
	err := s.Scan([]byte("k"), func(k, v []byte) error {
		got[string(k)] = string(v)
		s.Put([]byte("k2"), []byte("x")) // shorter value into the same memory
		s.Delete([]byte("k3"))
		s.Put([]byte("k4"), []byte("new"))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"k1": "backend", "k2": "live-long-value", "k3": "live"}
	if !maps.Equal(got, want) {
		t.Fatalf("Scan saw %v, want the state at its start %v", got, want)
	}
}

// TestStoreModel runs random operations against a Store and a plain map,
// comparing every read and scan, and checks that each checkpoint holds
// exactly the state at its barrier.
func TestStoreModel(t *testing.T) {
	for name, f := range factories(t) {
		t.Run(name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(1, uint64(len(name))))
			s := NewStore(openBackend(t, f, t.TempDir()))
			model := map[string]string{}
			type barrier struct {
				sealed *Sealed
				state  map[string]string
			}
			var waiting []barrier
			root := t.TempDir()
			persists := 0
			key := func() string { return fmt.Sprintf("k%d%d", rng.IntN(5), rng.IntN(8)) }
			for step := range 3000 {
				switch op := rng.IntN(100); {
				case op < 40:
					k, v := key(), fmt.Sprint(step)
					s.Put([]byte(k), []byte(v))
					model[k] = v
				case op < 55:
					k := key()
					s.Delete([]byte(k))
					delete(model, k)
				case op < 85:
					k := key()
					v, ok := mustGet(t, s, k)
					if w, wok := model[k]; v != w || ok != wok {
						t.Fatalf("step %d: Get(%q) = %q %v, want %q %v", step, k, v, ok, w, wok)
					}
				case op < 92:
					p := key()[:rng.IntN(3)]
					want := map[string]string{}
					for k, v := range model {
						if strings.HasPrefix(k, p) {
							want[k] = v
						}
					}
					if got := dump(t, s.Scan, p); !maps.Equal(got, want) {
						t.Fatalf("step %d: Scan(%q) = %v, want %v", step, p, got, want)
					}
				case op < 97:
					waiting = append(waiting, barrier{s.Seal(), maps.Clone(model)})
				default:
					if len(waiting) == 0 {
						continue
					}
					b := waiting[0]
					waiting = waiting[1:]
					persists++
					dir := filepath.Join(root, fmt.Sprint(persists))
					files, err := s.Persist(b.sealed, dir)
					if err != nil {
						t.Fatal(err)
					}
					if persists%5 == 0 {
						restored := filepath.Join(t.TempDir(), "r")
						copyFiles(t, dir, restored, files)
						r := openBackend(t, f, restored)
						if got := dump(t, r.Scan, ""); !maps.Equal(got, b.state) {
							t.Fatalf("step %d: checkpoint holds %v, want the barrier's state %v", step, got, b.state)
						}
						_ = r.Close()
					}
				}
				if s.SealedCount() != len(waiting) {
					t.Fatalf("SealedCount %d, want %d", s.SealedCount(), len(waiting))
				}
			}
			if persists < 10 {
				t.Fatalf("only %d persists: the test does not test much", persists)
			}
		})
	}
}

// TestStoreConcurrentPersist counts in the task goroutine while another
// goroutine persists sealed buffers, as the checkpoint's asynchronous part
// does; run with -race. Every increment must be counted exactly once and the
// last checkpoint must hold the final counts.
func TestStoreConcurrentPersist(t *testing.T) {
	for name, f := range factories(t) {
		t.Run(name, func(t *testing.T) {
			s := NewStore(openBackend(t, f, t.TempDir()))
			counter := NewValueState("count", Int64)
			scope := &Scope{Store: s, Operator: "counter"}
			const keys, ops, sealEvery = 97, 30000, 1500

			type job struct {
				sealed *Sealed
				dir    string
			}
			jobs := make(chan job, 2) // a full channel is the backpressure
			var (
				wg       sync.WaitGroup
				lastDir  string
				lastFile []string
				perr     error
			)
			wg.Go(func() {
				for j := range jobs {
					files, err := s.Persist(j.sealed, j.dir)
					if err != nil {
						perr = err
						return
					}
					lastDir, lastFile = j.dir, files
				}
			})
			root := t.TempDir()
			want := map[string]int64{}
			for i := range ops {
				k := fmt.Sprintf("key-%d", i*7%keys)
				scope.Key = []byte(k)
				n, _, err := counter.Get(scope)
				if err != nil {
					t.Fatal(err)
				}
				if n != want[k] {
					t.Fatalf("op %d: count of %s = %d, want %d", i, k, n, want[k])
				}
				if err := counter.Set(scope, n+1); err != nil {
					t.Fatal(err)
				}
				want[k]++
				if i%sealEvery == sealEvery-1 {
					jobs <- job{s.Seal(), filepath.Join(root, fmt.Sprint(i))}
				}
				if i%5000 == 0 {
					if got := dump(t, s.Scan, ""); len(got) != len(want) {
						t.Fatalf("Scan found %d keys, want %d", len(got), len(want))
					}
				}
			}
			jobs <- job{s.Seal(), filepath.Join(root, "final")}
			close(jobs)
			wg.Wait()
			if perr != nil {
				t.Fatal(perr)
			}
			if s.SealedCount() != 0 {
				t.Fatalf("%d buffers still sealed", s.SealedCount())
			}
			restored := filepath.Join(t.TempDir(), "r")
			copyFiles(t, lastDir, restored, lastFile)
			rs := NewStore(openBackend(t, f, restored))
			rscope := &Scope{Store: rs, Operator: "counter"}
			for k, w := range want {
				rscope.Key = []byte(k)
				if n, _, err := counter.Get(rscope); err != nil || n != w {
					t.Fatalf("restored count of %s = %d (%v), want %d", k, n, err, w)
				}
			}
		})
	}
}
