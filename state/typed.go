package state

import (
	"errors"
	"fmt"
)

// Scope is where keyed state is read and written: the task's store, the
// operator uid and the current key. A keyed operator owns one Scope and
// sets Key before calling the user's function for each record; the state
// handles build storage keys and encode values in the Scope's scratch
// buffers, so a record costs no allocation for that. A Scope belongs to the
// task goroutine.
type Scope struct {
	Store    *Store
	Operator string
	Key      []byte

	key   []byte // scratch: storage key
	value []byte // scratch: encoded value
}

// stateKey builds the storage key of (s.Operator, name, s.Key) in the
// scratch buffer; the result is valid until the next handle call on s.
func (s *Scope) stateKey(name string) []byte {
	s.key = StateKey(s.key[:0], s.Operator, name, s.Key, nil)
	return s.key
}

// encode appends v to dst with c, through AppendErr if c can fail.
func encode[T any](dst []byte, c Codec[T], fc FallibleCodec[T], v T) ([]byte, error) {
	if fc != nil {
		return fc.AppendErr(dst, v)
	}
	return c.Append(dst, v), nil
}

// ValueState is one value per key, like Flink's ValueState. It is a handle:
// declare it once per operator, use it with the Scope of each record.
type ValueState[T any] struct {
	name string
	c    Codec[T]
	fc   FallibleCodec[T] // c, if it can fail to encode
}

// NewValueState returns a handle on the value state called name (unique
// within its operator; it is part of the storage key, so renaming it loses
// the state).
func NewValueState[T any](name string, c Codec[T]) ValueState[T] {
	fc, _ := c.(FallibleCodec[T])
	return ValueState[T]{name: name, c: c, fc: fc}
}

// Name returns the state's name.
func (v ValueState[T]) Name() string { return v.name }

// Get returns the current key's value and whether it is set.
func (v ValueState[T]) Get(s *Scope) (T, bool, error) {
	var zero T
	b, ok, _, err := s.Store.lookup(s.stateKey(v.name))
	if err != nil {
		return zero, false, fmt.Errorf("state %q: %w", v.name, err)
	}
	if !ok {
		return zero, false, nil
	}
	val, err := v.c.Decode(b)
	if err != nil {
		return zero, false, fmt.Errorf("state %q: decode value: %w", v.name, err)
	}
	return val, true, nil
}

// Set sets the current key's value.
func (v ValueState[T]) Set(s *Scope, val T) error {
	b, err := encode(s.value[:0], v.c, v.fc, val)
	if err != nil {
		return fmt.Errorf("state %q: encode value: %w", v.name, err)
	}
	s.value = b
	s.Store.Put(s.stateKey(v.name), b)
	return nil
}

// Clear removes the current key's value.
func (v ValueState[T]) Clear(s *Scope) { s.Store.Delete(s.stateKey(v.name)) }

// MapState is a map per key, like Flink's MapState: each map entry is its
// own storage entry, so reading or writing one entry does not touch the
// others.
type MapState[K, V any] struct {
	name string
	kc   Codec[K]
	kfc  FallibleCodec[K]
	vc   Codec[V]
	vfc  FallibleCodec[V]
}

// NewMapState returns a handle on the map state called name (unique within
// its operator). Range visits map keys in the byte order of kc's encoding,
// which for the built-in codecs is their natural order.
func NewMapState[K, V any](name string, kc Codec[K], vc Codec[V]) MapState[K, V] {
	kfc, _ := kc.(FallibleCodec[K])
	vfc, _ := vc.(FallibleCodec[V])
	return MapState[K, V]{name: name, kc: kc, kfc: kfc, vc: vc, vfc: vfc}
}

// Name returns the state's name.
func (m MapState[K, V]) Name() string { return m.name }

// entryKey builds the storage key of map key k of the current key in the
// scope's scratch buffer.
func (m MapState[K, V]) entryKey(s *Scope, k K) ([]byte, error) {
	b, err := encode(s.stateKey(m.name), m.kc, m.kfc, k)
	if err != nil {
		return nil, fmt.Errorf("state %q: encode map key: %w", m.name, err)
	}
	s.key = b
	return b, nil
}

// Get returns the value of map key k of the current key and whether it is
// set.
func (m MapState[K, V]) Get(s *Scope, k K) (V, bool, error) {
	var zero V
	key, err := m.entryKey(s, k)
	if err != nil {
		return zero, false, err
	}
	b, ok, _, err := s.Store.lookup(key)
	if err != nil {
		return zero, false, fmt.Errorf("state %q: %w", m.name, err)
	}
	if !ok {
		return zero, false, nil
	}
	val, err := m.vc.Decode(b)
	if err != nil {
		return zero, false, fmt.Errorf("state %q: decode value: %w", m.name, err)
	}
	return val, true, nil
}

// Put sets map key k of the current key to v.
func (m MapState[K, V]) Put(s *Scope, k K, v V) error {
	b, err := encode(s.value[:0], m.vc, m.vfc, v)
	if err != nil {
		return fmt.Errorf("state %q: encode value: %w", m.name, err)
	}
	s.value = b
	key, err := m.entryKey(s, k)
	if err != nil {
		return err
	}
	s.Store.Put(key, b)
	return nil
}

// Delete removes map key k of the current key.
func (m MapState[K, V]) Delete(s *Scope, k K) {
	key, err := m.entryKey(s, k)
	if err != nil {
		// A map key that cannot be encoded was never stored (Put failed on
		// it too), so there is nothing to delete.
		return
	}
	s.Store.Delete(key)
}

// errStopRange ends a Range early when fn returns false.
var errStopRange = errors.New("stop range")

// Range calls fn for every entry of the current key's map, in map-key
// order, until fn returns false. fn may use the scope, including writing
// this map; the range does not see those writes.
func (m MapState[K, V]) Range(s *Scope, fn func(K, V) bool) error {
	// Its own buffer, not the scope's scratch: fn may use the scope, and the
	// backend reads the prefix during the whole scan.
	prefix := StateKey(nil, s.Operator, m.name, s.Key, nil)
	err := s.Store.Scan(prefix, func(key, value []byte) error {
		k, err := m.kc.Decode(key[len(prefix):])
		if err != nil {
			return fmt.Errorf("decode map key: %w", err)
		}
		v, err := m.vc.Decode(value)
		if err != nil {
			return fmt.Errorf("decode value: %w", err)
		}
		if !fn(k, v) {
			return errStopRange
		}
		return nil
	})
	if err != nil && !errors.Is(err, errStopRange) {
		return fmt.Errorf("state %q: range: %w", m.name, err)
	}
	return nil
}
