package state

import (
	"fmt"
	"path/filepath"
	"runtime"
	"testing"
)

// BenchmarkSeal seals live buffers of very different sizes: the time per
// Seal must not depend on the size. Each iteration puts the same prepared
// buffer back as the live one, so only the Seal is timed, plus emptying the
// sealed list so that it does not grow with b.N.
func BenchmarkSeal(b *testing.B) {
	for _, n := range []int{10, 10_000, 1_000_000} {
		b.Run(fmt.Sprintf("entries=%d", n), func(b *testing.B) {
			s := NewStore(openBackend(b, NewMemoryFactory(), ""))
			for i := range n {
				s.Put(fmt.Appendf(nil, "key-%09d", i), []byte("value"))
			}
			live, empty := s.live, &sealedList{}
			runtime.GC() // not to time the collection of the setup's garbage
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				s.live = live
				s.Seal()
				s.sealed.Store(empty)
			}
		})
	}
}

// BenchmarkValueStateGetSet is the record loop of a keyed count on Pebble:
// Get and Set of a ValueState per record.
//
//   - live: the keys were written since the last barrier, so both hit the
//     write buffer (the steady state of hot keys).
//   - backend: every Get misses the buffers and reads Pebble; a barrier
//     (Seal and Persist, untimed) every 50 000 records persists the writes.
func BenchmarkValueStateGetSet(b *testing.B) {
	const keys = 100_000
	keyOf := make([][]byte, keys)
	for i := range keyOf {
		keyOf[i] = fmt.Appendf(nil, "user-%06d", i*7919%keys)
	}
	setup := func(b *testing.B) (*Store, *Scope, ValueState[int64]) {
		pf := NewPebbleFactory(64 << 20)
		b.Cleanup(func() { _ = pf.Close() })
		s := NewStore(openBackend(b, pf, b.TempDir()))
		sc := &Scope{Store: s, Operator: "count"}
		vs := NewValueState("count", Int64)
		for _, k := range keyOf {
			sc.Key = k
			if err := vs.Set(sc, 1); err != nil {
				b.Fatal(err)
			}
		}
		return s, sc, vs
	}
	step := func(b *testing.B, sc *Scope, vs ValueState[int64], key []byte) {
		sc.Key = key
		n, _, err := vs.Get(sc)
		if err != nil {
			b.Fatal(err)
		}
		if err := vs.Set(sc, n+1); err != nil {
			b.Fatal(err)
		}
	}

	b.Run("live", func(b *testing.B) {
		_, sc, vs := setup(b)
		b.ReportAllocs()
		b.ResetTimer()
		for i := range b.N {
			step(b, sc, vs, keyOf[i%keys])
		}
	})

	b.Run("backend", func(b *testing.B) {
		s, sc, vs := setup(b)
		root := b.TempDir()
		barrier := func(i int) {
			if _, err := s.Persist(s.Seal(), filepath.Join(root, fmt.Sprint(i))); err != nil {
				b.Fatal(err)
			}
		}
		barrier(-1)
		const every = 50_000 // < keys: no key is read twice between barriers
		b.ReportAllocs()
		b.ResetTimer()
		for i := range b.N {
			if i%every == every-1 {
				b.StopTimer()
				barrier(i)
				b.StartTimer()
			}
			step(b, sc, vs, keyOf[i%keys])
		}
	})
}
