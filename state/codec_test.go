package state

import (
	"bytes"
	"math"
	"slices"
	"strings"
	"testing"
)

func roundTrip[T any](t *testing.T, c Codec[T], vals []T, eq func(a, b T) bool) {
	t.Helper()
	for _, v := range vals {
		b := c.Append([]byte("pre"), v)
		if !bytes.HasPrefix(b, []byte("pre")) {
			t.Fatalf("Append(%v) did not append", v)
		}
		got, err := c.Decode(b[3:])
		if err != nil || !eq(got, v) {
			t.Fatalf("round trip of %v gave %v, %v", v, got, err)
		}
	}
}

// checkOrder: for sorted vals, the encodings sort the same way.
func checkOrder[T any](t *testing.T, c Codec[T], sorted []T) {
	t.Helper()
	for i := 1; i < len(sorted); i++ {
		a, b := c.Append(nil, sorted[i-1]), c.Append(nil, sorted[i])
		if bytes.Compare(a, b) >= 0 {
			t.Fatalf("encoding of %v (%x) does not sort before %v (%x)", sorted[i-1], a, sorted[i], b)
		}
	}
}

func eq[T comparable](a, b T) bool { return a == b }

func TestCodecs(t *testing.T) {
	ints := []int64{math.MinInt64, -1 << 40, -2, -1, 0, 1, 2, 1 << 40, math.MaxInt64}
	roundTrip(t, Int64, ints, eq)
	checkOrder(t, Int64, ints)

	uints := []uint64{0, 1, 255, 256, 1 << 63, math.MaxUint64}
	roundTrip(t, Uint64, uints, eq)
	checkOrder(t, Uint64, uints)

	floats := []float64{math.Inf(-1), -math.MaxFloat64, -1.5, -math.SmallestNonzeroFloat64, 0, math.SmallestNonzeroFloat64, 1, 1.5, math.MaxFloat64, math.Inf(1)}
	roundTrip(t, Float64, floats, eq)
	checkOrder(t, Float64, floats)
	nan, err := Float64.Decode(Float64.Append(nil, math.NaN()))
	if err != nil || !math.IsNaN(nan) {
		t.Fatalf("NaN round trip: %v %v", nan, err)
	}
	if negZero, _ := Float64.Decode(Float64.Append(nil, math.Copysign(0, -1))); !math.Signbit(negZero) {
		t.Fatal("-0 lost its sign")
	}

	roundTrip(t, Bool, []bool{false, true}, eq)
	checkOrder(t, Bool, []bool{false, true})

	strs := []string{"", "a", "a\x00", "ab", "b", "\xff"}
	roundTrip(t, String, strs, eq)
	checkOrder(t, String, strs)

	roundTrip(t, Bytes, [][]byte{nil, {}, {0}, []byte("abc")}, func(a, b []byte) bool { return bytes.Equal(a, b) })
	src := []byte("abc")
	got, _ := Bytes.Decode(src)
	got[0] = 'X'
	if string(src) != "abc" {
		t.Fatal("Bytes.Decode returned an alias of its input")
	}

	type point struct {
		X, Y int
		Tags []string
	}
	pc := JSON[point]()
	roundTrip(t, pc, []point{{}, {1, 2, []string{"a"}}}, func(a, b point) bool {
		return a.X == b.X && a.Y == b.Y && slices.Equal(a.Tags, b.Tags)
	})
}

func TestCodecDecodeErrors(t *testing.T) {
	inputs := [][]byte{nil, {}, {1}, {1, 2, 3, 4, 5, 6, 7}, {1, 2, 3, 4, 5, 6, 7, 8, 9}, []byte("{not json"), {2}}
	decoders := map[string]func([]byte) error{
		"int64":   func(b []byte) error { _, err := Int64.Decode(b); return err },
		"uint64":  func(b []byte) error { _, err := Uint64.Decode(b); return err },
		"float64": func(b []byte) error { _, err := Float64.Decode(b); return err },
		"bool":    func(b []byte) error { _, err := Bool.Decode(b); return err },
		"json":    func(b []byte) error { _, err := JSON[map[string]int]().Decode(b); return err },
	}
	valid := map[string]func([]byte) bool{
		"int64":   func(b []byte) bool { return len(b) == 8 },
		"uint64":  func(b []byte) bool { return len(b) == 8 },
		"float64": func(b []byte) bool { return len(b) == 8 },
		"bool":    func(b []byte) bool { return len(b) == 1 && b[0] <= 1 },
		"json":    func(b []byte) bool { return false },
	}
	for name, dec := range decoders {
		for _, in := range inputs {
			err := dec(in)
			if (err == nil) != valid[name](in) {
				t.Errorf("%s.Decode(%x): err %v", name, in, err)
			}
			if err != nil && !strings.HasPrefix(err.Error(), name+":") {
				t.Errorf("%s.Decode error %q does not say which codec", name, err)
			}
		}
	}
}

func TestJSONEncodeError(t *testing.T) {
	c := JSON[float64]()
	fc, ok := c.(FallibleCodec[float64])
	if !ok {
		t.Fatal("JSON codec is not a FallibleCodec")
	}
	if _, err := fc.AppendErr(nil, math.NaN()); err == nil {
		t.Fatal("AppendErr(NaN) succeeded")
	}
	defer func() {
		if recover() == nil {
			t.Fatal("Append(NaN) did not panic")
		}
	}()
	c.Append(nil, math.NaN())
}
