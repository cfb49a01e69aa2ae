package state

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// StateKey appends to dst the storage key of one keyed-state entry: the
// operator uid, the state name and the user's key (the Kafka record key
// bytes for a keyed stream), each as a uvarint length and the bytes, then
// sub, the encoded MapState map key, as is (empty for a ValueState).
//
// Because the three first fields are length-prefixed, StateKey(dst, op,
// name, key, nil) is a prefix of exactly the entries of (op, name, key):
// no other record key's entries start with it, so a prefix scan finds that
// key's MapState entries and nothing else, in map-key byte order. sub is
// not length-prefixed so that this order is the order of its encoding.
func StateKey(dst []byte, operator, name string, key, sub []byte) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(operator)))
	dst = append(dst, operator...)
	dst = binary.AppendUvarint(dst, uint64(len(name)))
	dst = append(dst, name...)
	dst = binary.AppendUvarint(dst, uint64(len(key)))
	dst = append(dst, key...)
	return append(dst, sub...)
}

// ParseStateKey splits a key made by StateKey into its parts, for
// savepoints and for re-splitting state by record key. key and sub alias k.
// A ValueState's key and a MapState entry whose map key encodes to nothing
// both give an empty sub.
func ParseStateKey(k []byte) (operator, name string, key, sub []byte, err error) {
	rest := k
	field := func() ([]byte, error) {
		n, w := binary.Uvarint(rest)
		if w <= 0 {
			return nil, errors.New("bad length")
		}
		if n > uint64(len(rest)-w) {
			return nil, errors.New("length beyond end of key")
		}
		f := rest[w : w+int(n) : w+int(n)]
		rest = rest[w+int(n):]
		return f, nil
	}
	op, err := field()
	if err != nil {
		return "", "", nil, nil, fmt.Errorf("state: parse key %q: operator: %w", k, err)
	}
	nm, err := field()
	if err != nil {
		return "", "", nil, nil, fmt.Errorf("state: parse key %q: name: %w", k, err)
	}
	key, err = field()
	if err != nil {
		return "", "", nil, nil, fmt.Errorf("state: parse key %q: record key: %w", k, err)
	}
	return string(op), string(nm), key, rest, nil
}
