package operators

import "fmt"

// Stream is a typed stream of records of a job. Streams are values that
// describe the graph; the records flow only in the chains that Job.Build
// creates. A Stream may feed several downstream operators (fan-out): each
// receives every record, in order of definition.
//
// The zero Stream belongs to no job: the functions of this package panic on
// it as on a nil *Job, a mistake in the program rather than in its input.
// Get streams from FromKafka and the operators.
type Stream[T any] struct {
	n *node[T]
}

// node is one stream of the graph. outs are factories of the stream's
// consumers: Build calls each once per task to get the per-task function that
// takes the stream's records.
type node[T any] struct {
	job  *Job
	id   int
	from string
	outs []func(*builder) (func(T) error, error)
}

// streamInfo is what Validate needs of a node, whatever its record type.
type streamInfo interface {
	consumers() int
	origin() string
}

func (n *node[T]) consumers() int { return len(n.outs) }
func (n *node[T]) origin() string { return n.from }

func newNode[T any](j *Job, from string) *node[T] {
	n := &node[T]{job: j, id: len(j.streams), from: from}
	j.streams = append(j.streams, n)
	return n
}

// consume adds a consumer factory to the stream.
func (n *node[T]) consume(f func(*builder) (func(T) error, error)) {
	n.outs = append(n.outs, f)
}

// build returns the task's function that pushes a record of this stream to
// every consumer. It is memoized per task because a stream merged into
// another (Merge) is reached from several upstreams but must exist once: a
// stateful operator downstream of it owns one state scope per task.
func (n *node[T]) build(b *builder) (func(T) error, error) {
	if f, ok := b.built[n.id]; ok {
		return f.(func(T) error), nil
	}
	fs := make([]func(T) error, 0, len(n.outs))
	for _, out := range n.outs {
		f, err := out(b)
		if err != nil {
			return nil, err
		}
		fs = append(fs, f)
	}
	push := fanOut(fs)
	b.built[n.id] = push
	return push, nil
}

// fanOut avoids the loop for the common single consumer.
func fanOut[T any](fs []func(T) error) func(T) error {
	if len(fs) == 1 {
		return fs[0]
	}
	return func(v T) error {
		for _, f := range fs {
			if err := f(v); err != nil {
				return err
			}
		}
		return nil
	}
}

// Map applies f to every record.
func Map[T, U any](s Stream[T], f func(T) U) Stream[U] {
	out := newNode[U](s.n.job, caller("operators.Map"))
	if f == nil {
		s.n.job.fail(fmt.Errorf("%s: nil function", out.from))
	}
	s.n.consume(func(b *builder) (func(T) error, error) {
		next, err := out.build(b)
		if err != nil {
			return nil, err
		}
		return func(v T) error { return next(f(v)) }, nil
	})
	return Stream[U]{out}
}

// MapErr applies f to every record. An error from f fails the task with a
// *RecordError naming the input record; use it for conditions that need a
// fix and a restart, not for bad data that should be skipped (drop that with
// FlatMap or Filter instead).
func MapErr[T, U any](s Stream[T], f func(T) (U, error)) Stream[U] {
	out := newNode[U](s.n.job, caller("operators.MapErr"))
	if f == nil {
		s.n.job.fail(fmt.Errorf("%s: nil function", out.from))
	}
	s.n.consume(func(b *builder) (func(T) error, error) {
		next, err := out.build(b)
		if err != nil {
			return nil, err
		}
		return func(v T) error {
			u, err := f(v)
			if err != nil {
				return err
			}
			return next(u)
		}, nil
	})
	return Stream[U]{out}
}

// Filter keeps the records for which keep returns true.
func Filter[T any](s Stream[T], keep func(T) bool) Stream[T] {
	out := newNode[T](s.n.job, caller("operators.Filter"))
	if keep == nil {
		s.n.job.fail(fmt.Errorf("%s: nil function", out.from))
	}
	s.n.consume(func(b *builder) (func(T) error, error) {
		next, err := out.build(b)
		if err != nil {
			return nil, err
		}
		return func(v T) error {
			if !keep(v) {
				return nil
			}
			return next(v)
		}, nil
	})
	return Stream[T]{out}
}

// FlatMap calls f once per record; f emits zero or more records by calling
// emit, which passes each one downstream at once (the records are not
// buffered). emit is valid only during the call to f.
func FlatMap[T, U any](s Stream[T], f func(in T, emit func(U))) Stream[U] {
	out := newNode[U](s.n.job, caller("operators.FlatMap"))
	if f == nil {
		s.n.job.fail(fmt.Errorf("%s: nil function", out.from))
	}
	s.n.consume(func(b *builder) (func(T) error, error) {
		next, err := out.build(b)
		if err != nil {
			return nil, err
		}
		em := emitter[U]{next: next}
		emit := em.emit
		return func(v T) error {
			f(v, emit)
			return em.result()
		}, nil
	})
	return Stream[U]{out}
}

// Merge combines streams of the same job and type into one, for example
// co-partitioned inputs mapped to a common type before a keyed Process. For
// each input record the merged stream receives what its upstreams emit, in
// the order they emit it.
func Merge[T any](first Stream[T], more ...Stream[T]) Stream[T] {
	j := first.n.job
	out := newNode[T](j, caller("operators.Merge"))
	first.n.consume(out.build)
	for _, s := range more {
		if s.n.job != j {
			j.fail(fmt.Errorf("%s: streams of different jobs", out.from))
			continue
		}
		s.n.consume(out.build)
	}
	return Stream[T]{out}
}

// emitter adapts the user's emit callback, which cannot return an error, to
// the chain's error-returning functions: it keeps the first downstream error,
// drops whatever the user emits after it, and hands it back once the user's
// function returns. Built once per task, so emitting does not allocate.
type emitter[U any] struct {
	next func(U) error
	err  error
}

func (e *emitter[U]) emit(v U) {
	if e.err == nil {
		e.err = e.next(v)
	}
}

// result returns the first downstream error of the call and resets it for
// the next record.
func (e *emitter[U]) result() error {
	err := e.err
	e.err = nil
	return err
}
