package state

import (
	"bytes"
	"math/rand/v2"
	"testing"
)

func TestStateKeyRoundTrip(t *testing.T) {
	long := bytes.Repeat([]byte{0xff}, 300) // a length needing a 2-byte uvarint
	for _, c := range []struct {
		op, name string
		key, sub []byte
	}{
		{"", "", nil, nil},
		{"op", "", nil, nil},
		{"", "name", nil, nil},
		{"", "", []byte("k"), nil},
		{"", "", nil, []byte("s")},
		{"op", "name", []byte("key"), []byte("sub")},
		{"op", "name", []byte{}, []byte{0}},
		{"op\x00", "na\xffme", []byte{0, 0}, []byte{0xff}},
		{string(long), string(long), long, long},
	} {
		k := StateKey([]byte("junk"), c.op, c.name, c.key, c.sub)[4:]
		op, name, key, sub, err := ParseStateKey(k)
		if err != nil {
			t.Fatalf("%+v: %v", c, err)
		}
		if op != c.op || name != c.name || !bytes.Equal(key, c.key) || !bytes.Equal(sub, c.sub) {
			t.Fatalf("round trip of %+v gave %q %q %q %q", c, op, name, key, sub)
		}
	}
}

func randBytes(rng *rand.Rand, max int) []byte {
	b := make([]byte, rng.IntN(max+1))
	for i := range b {
		b[i] = byte(rng.IntN(4)) // few symbols: many shared prefixes
	}
	return b
}

// TestStateKeyPrefixFree: the scan prefix of one (operator, name, key) never
// starts the entries of another, and parsing random keys round-trips.
func TestStateKeyPrefixFree(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	for range 20000 {
		op1, op2 := string(randBytes(rng, 3)), string(randBytes(rng, 3))
		n1, n2 := string(randBytes(rng, 3)), string(randBytes(rng, 3))
		k1, k2 := randBytes(rng, 4), randBytes(rng, 4)
		sub := randBytes(rng, 4)
		prefix := StateKey(nil, op1, n1, k1, nil)
		entry := StateKey(nil, op2, n2, k2, sub)
		same := op1 == op2 && n1 == n2 && bytes.Equal(k1, k2)
		if bytes.HasPrefix(entry, prefix) != same {
			t.Fatalf("prefix of (%q,%q,%q) vs entry (%q,%q,%q,%q): HasPrefix %v",
				op1, n1, k1, op2, n2, k2, sub, !same)
		}
		op, name, key, s, err := ParseStateKey(entry)
		if err != nil || op != op2 || name != n2 || !bytes.Equal(key, k2) || !bytes.Equal(s, sub) {
			t.Fatalf("ParseStateKey(%x) = %q %q %q %q %v", entry, op, name, key, s, err)
		}
	}
}

func TestParseStateKeyErrors(t *testing.T) {
	good := StateKey(nil, "operator", "name", []byte("key"), nil)
	for n := range len(good) { // every strict truncation cuts a field
		if _, _, _, _, err := ParseStateKey(good[:n]); err == nil {
			t.Errorf("ParseStateKey(%q) succeeded", good[:n])
		}
	}
	for _, bad := range [][]byte{
		{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, // uvarint overflow
		{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01},       // 2^64-1: length beyond end
		{0x80},
	} {
		if _, _, _, _, err := ParseStateKey(bad); err == nil {
			t.Errorf("ParseStateKey(%x) succeeded", bad)
		}
	}
}

// FuzzParseStateKey: no input panics, and whatever parses re-encodes to a
// key with the same parts.
func FuzzParseStateKey(f *testing.F) {
	f.Add(StateKey(nil, "op", "name", []byte("key"), []byte("sub")))
	f.Add([]byte{})
	f.Add([]byte{0x80, 0x00, 0x00, 0x00})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01})
	f.Fuzz(func(t *testing.T, k []byte) {
		op, name, key, sub, err := ParseStateKey(k)
		if err != nil {
			return
		}
		op2, name2, key2, sub2, err := ParseStateKey(StateKey(nil, op, name, key, sub))
		if err != nil || op2 != op || name2 != name || !bytes.Equal(key2, key) || !bytes.Equal(sub2, sub) {
			t.Fatalf("re-encoding %x changed its parts", k)
		}
	})
}
