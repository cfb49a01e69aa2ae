package state

import (
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestValueState(t *testing.T) {
	for name, f := range factories(t) {
		t.Run(name, func(t *testing.T) {
			s := NewStore(openBackend(t, f, t.TempDir()))
			count := NewValueState("count", Int64)
			label := NewValueState("label", String)
			if count.Name() != "count" {
				t.Fatalf("Name = %q", count.Name())
			}
			a := &Scope{Store: s, Operator: "op-a"}
			b := &Scope{Store: s, Operator: "op-b"}
			get := func(sc *Scope, key string) (int64, bool) {
				t.Helper()
				sc.Key = []byte(key)
				v, ok, err := count.Get(sc)
				if err != nil {
					t.Fatal(err)
				}
				return v, ok
			}
			set := func(sc *Scope, key string, v int64) {
				t.Helper()
				sc.Key = []byte(key)
				if err := count.Set(sc, v); err != nil {
					t.Fatal(err)
				}
			}
			if _, ok := get(a, "k"); ok {
				t.Fatal("unset value found")
			}
			set(a, "k", -5)
			set(a, "", 7) // the empty key (a record without key) is a key too
			set(b, "k", 100)
			a.Key = []byte("k")
			if err := label.Set(a, "hello"); err != nil {
				t.Fatal(err)
			}
			sealed := s.Seal()
			set(a, "k", 42)
			check := func(stage string) {
				t.Helper()
				for _, c := range []struct {
					sc   *Scope
					key  string
					want int64
				}{{a, "k", 42}, {a, "", 7}, {b, "k", 100}} {
					if v, ok := get(c.sc, c.key); !ok || v != c.want {
						t.Fatalf("%s: %s/%q = %d %v, want %d", stage, c.sc.Operator, c.key, v, ok, c.want)
					}
				}
				a.Key = []byte("k")
				if l, ok, err := label.Get(a); err != nil || !ok || l != "hello" {
					t.Fatalf("%s: label = %q %v %v", stage, l, ok, err)
				}
			}
			check("buffered")
			if _, err := s.Persist(sealed, filepath.Join(t.TempDir(), "c")); err != nil {
				t.Fatal(err)
			}
			check("persisted")
			b.Key = []byte("k")
			count.Clear(b)
			if _, ok := get(b, "k"); ok {
				t.Fatal("cleared value found")
			}
			if v, ok := get(a, "k"); !ok || v != 42 {
				t.Fatal("Clear of one operator's value cleared another's")
			}
		})
	}
}

func TestMapState(t *testing.T) {
	for name, f := range factories(t) {
		t.Run(name, func(t *testing.T) {
			s := NewStore(openBackend(t, f, t.TempDir()))
			m := NewMapState("events", Int64, String)
			if m.Name() != "events" {
				t.Fatalf("Name = %q", m.Name())
			}
			sc := &Scope{Store: s, Operator: "op"}
			put := func(key string, k int64, v string) {
				t.Helper()
				sc.Key = []byte(key)
				if err := m.Put(sc, k, v); err != nil {
					t.Fatal(err)
				}
			}
			rangeAll := func(key string) []string {
				t.Helper()
				sc.Key = []byte(key)
				var out []string
				if err := m.Range(sc, func(k int64, v string) bool {
					out = append(out, fmt.Sprintf("%d=%s", k, v))
					return true
				}); err != nil {
					t.Fatal(err)
				}
				return out
			}
			// Keys that are prefixes of each other must not see each other's
			// entries.
			put("a", 3, "three")
			put("a", -10, "minus ten")
			put("ab", 1, "other key")
			put("", 1, "empty key")
			s1 := s.Seal()
			put("a", 0, "zero")
			put("a", 7, "seven")
			sc.Key = []byte("a")
			m.Delete(sc, 3)
			s2 := s.Seal()
			put("a", 3, "three again")
			put("a", 100, "hundred")
			sc.Key = []byte("a")
			m.Delete(sc, 7)
			m.Delete(sc, 12345) // absent
			want := []string{"-10=minus ten", "0=zero", "3=three again", "100=hundred"}
			check := func(stage string) {
				t.Helper()
				if got := rangeAll("a"); !slices.Equal(got, want) {
					t.Fatalf("%s: Range(a) = %q, want %q", stage, got, want)
				}
				if got := rangeAll("ab"); !slices.Equal(got, []string{"1=other key"}) {
					t.Fatalf("%s: Range(ab) = %q", stage, got)
				}
				if got := rangeAll(""); !slices.Equal(got, []string{"1=empty key"}) {
					t.Fatalf("%s: Range('') = %q", stage, got)
				}
				if got := rangeAll("none"); len(got) != 0 {
					t.Fatalf("%s: Range(none) = %q", stage, got)
				}
				sc.Key = []byte("a")
				if v, ok, err := m.Get(sc, 3); err != nil || !ok || v != "three again" {
					t.Fatalf("%s: Get(3) = %q %v %v", stage, v, ok, err)
				}
				if _, ok, err := m.Get(sc, 7); err != nil || ok {
					t.Fatalf("%s: deleted Get(7) = %v %v", stage, ok, err)
				}
			}
			check("buffered")
			for i, sl := range []*Sealed{s1, s2} {
				if _, err := s.Persist(sl, filepath.Join(t.TempDir(), fmt.Sprint(i))); err != nil {
					t.Fatal(err)
				}
				check(fmt.Sprintf("%d persisted", i+1))
			}

			// Early stop, and writes from inside fn.
			sc.Key = []byte("a")
			var seen []int64
			if err := m.Range(sc, func(k int64, _ string) bool {
				seen = append(seen, k)
				if err := m.Put(sc, k+1000, "added"); err != nil {
					t.Fatal(err)
				}
				return len(seen) < 2
			}); err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(seen, []int64{-10, 0}) {
				t.Fatalf("early stop: saw %v", seen)
			}
			if v, ok, _ := m.Get(sc, 1000); !ok || v != "added" {
				t.Fatal("Put inside Range lost")
			}
		})
	}
}

func TestTypedDecodeErrors(t *testing.T) {
	s := NewStore(openBackend(t, NewMemoryFactory(), ""))
	sc := &Scope{Store: s, Operator: "op", Key: []byte("k")}
	vs := NewValueState("count", Int64)
	s.Put(StateKey(nil, "op", "count", []byte("k"), nil), []byte("short"))
	if _, _, err := vs.Get(sc); err == nil || !strings.Contains(err.Error(), `state "count"`) {
		t.Fatalf("ValueState.Get of bad bytes: %v", err)
	}

	ms := NewMapState("m", Int64, Bool)
	s.Put(StateKey(nil, "op", "m", []byte("k"), Int64.Append(nil, 1)), []byte{7})
	if _, _, err := ms.Get(sc, 1); err == nil || !strings.Contains(err.Error(), `state "m"`) {
		t.Fatalf("MapState.Get of bad value: %v", err)
	}
	err := ms.Range(sc, func(int64, bool) bool { return true })
	if err == nil || !strings.Contains(err.Error(), `state "m"`) || !strings.Contains(err.Error(), "decode value") {
		t.Fatalf("Range over bad value: %v", err)
	}
	s.Delete(StateKey(nil, "op", "m", []byte("k"), Int64.Append(nil, 1)))
	s.Put(StateKey(nil, "op", "m", []byte("k"), []byte("bad")), []byte{1})
	err = ms.Range(sc, func(int64, bool) bool { return true })
	if err == nil || !strings.Contains(err.Error(), "decode map key") {
		t.Fatalf("Range over bad map key: %v", err)
	}

	js := NewValueState("doc", JSON[map[string]int]())
	s.Put(StateKey(nil, "op", "doc", []byte("k"), nil), []byte("{"))
	if _, _, err := js.Get(sc); err == nil || !strings.Contains(err.Error(), `state "doc"`) {
		t.Fatalf("JSON decode error: %v", err)
	}
}

func TestTypedEncodeErrors(t *testing.T) {
	s := NewStore(openBackend(t, NewMemoryFactory(), ""))
	sc := &Scope{Store: s, Operator: "op", Key: []byte("k")}
	vs := NewValueState("f", JSON[float64]())
	if err := vs.Set(sc, math.NaN()); err == nil || !strings.Contains(err.Error(), `state "f"`) {
		t.Fatalf("Set(NaN) = %v", err)
	}
	if _, ok, _ := vs.Get(sc); ok {
		t.Fatal("failed Set stored something")
	}
	ms := NewMapState("m", JSON[float64](), JSON[float64]())
	if err := ms.Put(sc, math.NaN(), 1); err == nil {
		t.Fatal("Put with a NaN map key succeeded")
	}
	if err := ms.Put(sc, 1, math.NaN()); err == nil {
		t.Fatal("Put with a NaN value succeeded")
	}
	if _, _, err := ms.Get(sc, math.NaN()); err == nil {
		t.Fatal("Get with a NaN map key succeeded")
	}
	ms.Delete(sc, math.NaN()) // nothing to delete, and no panic
	if err := ms.Range(sc, func(float64, float64) bool { return true }); err != nil {
		t.Fatal(err)
	}
}

func TestBackendErrorHasStateName(t *testing.T) {
	b := openBackend(t, NewMemoryFactory(), "")
	s := NewStore(b)
	_ = b.Close()
	sc := &Scope{Store: s, Operator: "op", Key: []byte("k")}
	_, _, err := NewValueState("v", Int64).Get(sc)
	if !errors.Is(err, ErrClosed) || !strings.Contains(err.Error(), `state "v"`) {
		t.Fatalf("Get on closed backend: %v", err)
	}
	err = NewMapState("m", Int64, Int64).Range(sc, func(int64, int64) bool { return true })
	if !errors.Is(err, ErrClosed) || !strings.Contains(err.Error(), `state "m"`) {
		t.Fatalf("Range on closed backend: %v", err)
	}
}

// TestHotPathAllocs: reading and writing a key already in the live buffer,
// what a record loop does between two barriers, allocates nothing.
func TestHotPathAllocs(t *testing.T) {
	s := NewStore(openBackend(t, NewMemoryFactory(), ""))
	sc := &Scope{Store: s, Operator: "counter", Key: []byte("some-record-key")}
	vs := NewValueState("count", Int64)
	ms := NewMapState("m", Int64, Int64)
	if err := vs.Set(sc, 1); err != nil {
		t.Fatal(err)
	}
	if err := ms.Put(sc, 1, 1); err != nil {
		t.Fatal(err)
	}
	allocs := testing.AllocsPerRun(1000, func() {
		n, _, _ := vs.Get(sc)
		_ = vs.Set(sc, n+1)
		v, _, _ := ms.Get(sc, 1)
		_ = ms.Put(sc, 1, v+1)
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per Get/Set on a buffered key, want 0", allocs)
	}
}
