package operators

import (
	"fmt"

	"github.com/sluice-stream/sluice/state"
)

// KeyedStream is a stream whose records carry a key of type K, the scope of
// the keyed state of a downstream Process. Get one from KeyBy.
type KeyedStream[K, T any] struct {
	s     Stream[T]
	key   func(T) K
	codec state.Codec[K]
}

// KeyBy keys the records of s by key(record); codec encodes the key into the
// state store's key space (state.String, state.Int64, ...), so two keys are
// the same state exactly when their encodings are equal.
//
// Keyed state lives in the task, and a task sees only one partition of each
// input. Keyed state is therefore correct only when the input topics are
// partitioned by this same key (equal keys in equal partitions), which is
// what producers that set the record key to it do. KeyBy does not move
// records between tasks: keying by another field needs a repartition topic
// (written with ToKafka, read back with FromKafka) until Sluice does that for
// you.
func KeyBy[T, K any](s Stream[T], key func(T) K, codec state.Codec[K]) KeyedStream[K, T] {
	if key == nil {
		s.n.job.fail(fmt.Errorf("%s: nil key function", caller("operators.KeyBy")))
	}
	if codec == nil {
		s.n.job.fail(fmt.Errorf("%s: nil key codec", caller("operators.KeyBy")))
	}
	return KeyedStream[K, T]{s: s, key: key, codec: codec}
}

// Context is what a Process function knows of the record it is called for:
// its key and the keyed state scope. One Context per operator and task is
// reused for every record, so it is valid only during the call.
type Context[K any] struct {
	key   K
	scope *state.Scope
}

// Key returns the key of the current record.
func (c *Context[K]) Key() K { return c.key }

// State returns the state scope of the current key, for the operator's state
// declared by the user: count.Get(ctx.State()) with
// count := state.NewValueState[int64]("count", state.Int64).
func (c *Context[K]) State() *state.Scope { return c.scope }

// Process runs fn for every record of ks with the record's keyed state; fn
// emits zero or more records by calling out (valid only during the call).
//
// uid is the operator's stable id (Flink's uid): its state is stored under it
// in checkpoints and savepoints, and a restore maps state back to operators by
// it. Keep it when the code changes; it must be unique in the job and a
// [A-Za-z0-9._-]+ name. An error from fn fails the task with a *RecordError
// naming the input record; what fn wrote to state for that record is not
// rolled back, but the task restarts from its last checkpoint anyway.
func Process[K, T, U any](ks KeyedStream[K, T], uid string, fn func(ctx *Context[K], in T, out func(U)) error) Stream[U] {
	j := ks.s.n.job
	out := newNode[U](j, caller("operators.Process"))
	j.addUID(uid)
	if fn == nil {
		j.fail(fmt.Errorf("%s: nil function", out.from))
	}
	keyOf, codec := ks.key, ks.codec
	// A codec that can fail (state.JSON) panics in Append; AppendErr turns a
	// key it cannot encode into an error instead.
	fallible, _ := codec.(state.FallibleCodec[K])
	ks.s.n.consume(func(b *builder) (func(T) error, error) {
		if b.env.Store == nil {
			return nil, fmt.Errorf("operator %q: task has no state store", uid)
		}
		next, err := out.build(b)
		if err != nil {
			return nil, err
		}
		ctx := &Context[K]{scope: &state.Scope{Store: b.env.Store, Operator: uid}}
		em := emitter[U]{next: next}
		emit := em.emit
		var keyBuf []byte
		return func(v T) error {
			k := keyOf(v)
			// Encode into a buffer reused across records: the store copies
			// keys it keeps.
			if fallible != nil {
				b, err := fallible.AppendErr(keyBuf[:0], k)
				if err != nil {
					return fmt.Errorf("operator %q: encode key: %w", uid, err)
				}
				keyBuf = b
			} else {
				keyBuf = codec.Append(keyBuf[:0], k)
			}
			ctx.key, ctx.scope.Key = k, keyBuf
			if err := fn(ctx, v, emit); err != nil {
				// A downstream failure, which fn may have wrapped, carries
				// its own context; otherwise the error is fn's.
				if down := em.result(); down != nil {
					return down
				}
				return fmt.Errorf("operator %q: %w", uid, err)
			}
			return em.result()
		}, nil
	})
	return Stream[U]{out}
}
