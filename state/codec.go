package state

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
)

// Codec encodes and decodes the values (and MapState map keys) of keyed
// state. Encodings are part of the checkpoint and savepoint format: a codec
// must not change how it encodes a value once state was written with it.
type Codec[T any] interface {
	// Append appends the encoding of v to dst.
	Append(dst []byte, v T) []byte
	// Decode decodes a value from exactly b. It must return an error, never
	// panic, on bytes it cannot decode, and must not retain b: b may be
	// reused as soon as Decode returns.
	Decode(b []byte) (T, error)
}

// FallibleCodec is a Codec whose encoding can fail (JSON of a NaN, a
// marshaller's error). The state handles call AppendErr instead of Append,
// so such a failure reaches the caller as an error.
type FallibleCodec[T any] interface {
	Codec[T]
	// AppendErr appends the encoding of v to dst, or returns an error.
	AppendErr(dst []byte, v T) ([]byte, error)
}

// The built-in codecs. The fixed-size ones encode so that byte order is
// value order, which makes a MapState's Range visit numeric map keys in
// numeric order:
//   - Int64: 8 bytes big-endian of v with the sign bit flipped;
//   - Uint64: 8 bytes big-endian;
//   - Float64: 8 bytes big-endian of the IEEE 754 bits, with the sign bit
//     flipped for positive numbers and every bit flipped for negative ones;
//   - Bool: one byte, 0 or 1;
//   - String and Bytes: the bytes as they are.
var (
	// Int64 encodes an int64 in 8 bytes, in numeric order.
	Int64 Codec[int64] = int64Codec{}
	// Uint64 encodes a uint64 in 8 bytes, in numeric order.
	Uint64 Codec[uint64] = uint64Codec{}
	// Float64 encodes a float64 in 8 bytes, in numeric order.
	Float64 Codec[float64] = float64Codec{}
	// Bool encodes a bool in one byte.
	Bool Codec[bool] = boolCodec{}
	// String stores a string's bytes.
	String Codec[string] = stringCodec{}
	// Bytes stores a byte slice; Decode returns a copy.
	Bytes Codec[[]byte] = bytesCodec{}
)

const signBit = 1 << 63

func decode8(b []byte, what string) (uint64, error) {
	if len(b) != 8 {
		return 0, fmt.Errorf("%s: %d bytes, want 8", what, len(b))
	}
	return binary.BigEndian.Uint64(b), nil
}

type int64Codec struct{}

func (int64Codec) Append(dst []byte, v int64) []byte {
	return binary.BigEndian.AppendUint64(dst, uint64(v)^signBit)
}

func (int64Codec) Decode(b []byte) (int64, error) {
	u, err := decode8(b, "int64")
	if err != nil {
		return 0, err
	}
	return int64(u ^ signBit), nil
}

type uint64Codec struct{}

func (uint64Codec) Append(dst []byte, v uint64) []byte {
	return binary.BigEndian.AppendUint64(dst, v)
}

func (uint64Codec) Decode(b []byte) (uint64, error) { return decode8(b, "uint64") }

type float64Codec struct{}

func (float64Codec) Append(dst []byte, v float64) []byte {
	u := math.Float64bits(v)
	if u&signBit != 0 {
		u = ^u
	} else {
		u |= signBit
	}
	return binary.BigEndian.AppendUint64(dst, u)
}

func (float64Codec) Decode(b []byte) (float64, error) {
	u, err := decode8(b, "float64")
	if err != nil {
		return 0, err
	}
	if u&signBit != 0 {
		u &^= signBit
	} else {
		u = ^u
	}
	return math.Float64frombits(u), nil
}

type boolCodec struct{}

func (boolCodec) Append(dst []byte, v bool) []byte {
	if v {
		return append(dst, 1)
	}
	return append(dst, 0)
}

func (boolCodec) Decode(b []byte) (bool, error) {
	if len(b) != 1 || b[0] > 1 {
		return false, fmt.Errorf("bool: bytes %x, want 00 or 01", b)
	}
	return b[0] == 1, nil
}

type stringCodec struct{}

func (stringCodec) Append(dst []byte, v string) []byte { return append(dst, v...) }
func (stringCodec) Decode(b []byte) (string, error)    { return string(b), nil }

type bytesCodec struct{}

func (bytesCodec) Append(dst []byte, v []byte) []byte { return append(dst, v...) }

// Decode copies: the caller may keep and modify the result.
func (bytesCodec) Decode(b []byte) ([]byte, error) { return bytes.Clone(b), nil }

// JSON returns a codec that stores values as JSON (encoding/json), for
// structured state where a compact encoding does not matter. It is a
// FallibleCodec: the state handles report a value that cannot be marshalled
// as an error, while Append, which has no error result, panics on it.
func JSON[T any]() Codec[T] { return jsonCodec[T]{} }

type jsonCodec[T any] struct{}

func (c jsonCodec[T]) Append(dst []byte, v T) []byte {
	dst, err := c.AppendErr(dst, v)
	if err != nil {
		panic(err)
	}
	return dst
}

func (jsonCodec[T]) AppendErr(dst []byte, v T) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return dst, fmt.Errorf("json: %w", err)
	}
	return append(dst, b...), nil
}

func (jsonCodec[T]) Decode(b []byte) (T, error) {
	var v T
	if err := json.Unmarshal(b, &v); err != nil {
		var zero T
		return zero, fmt.Errorf("json: %w", err)
	}
	return v, nil
}
