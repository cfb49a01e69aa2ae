package sink

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"sync"

	"github.com/twmb/franz-go/pkg/kgo"
)

// Stdout is a sink that prints every record as "topic\tkey\tvalue\n" to a
// writer shared by all tasks. It has no transactions: output is flushed at
// every barrier and on Close.
type Stdout struct {
	mu  sync.Mutex
	w   *bufio.Writer
	err error // first write error
}

var _ Sink = (*Stdout)(nil)

// NewStdout returns a sink printing to w (os.Stdout in the binary).
func NewStdout(w io.Writer) Sink {
	return &Stdout{w: bufio.NewWriter(w)}
}

// Recover has nothing to commit; committables of another sink cannot be
// recovered here.
func (s *Stdout) Recover(_ context.Context, task int32, cs []Committable) ([]Outcome, error) {
	if len(cs) > 0 {
		return nil, fmt.Errorf("stdout sink: task %d has %d pending Kafka transactions: recover them with the Kafka sink first", task, len(cs))
	}
	return nil, nil
}

// NewWriter returns the writer of task.
func (s *Stdout) NewWriter(_ context.Context, task int32) (Writer, error) {
	return &stdoutWriter{s: s, task: task}, nil
}

// Close flushes buffered output.
func (s *Stdout) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.flushLocked()
}

func (s *Stdout) flushLocked() error {
	if err := s.w.Flush(); err != nil && s.err == nil {
		s.err = err
	}
	return s.err
}

type stdoutWriter struct {
	s     *Stdout
	task  int32
	stats counters
}

var (
	_ Writer        = (*stdoutWriter)(nil)
	_ StatsReporter = (*stdoutWriter)(nil)
)

// Write prints r.
func (w *stdoutWriter) Write(r *kgo.Record) {
	w.stats.records.Add(1)
	s := w.s
	s.mu.Lock()
	defer s.mu.Unlock()
	s.w.WriteString(r.Topic)
	s.w.WriteByte('\t')
	s.w.Write(r.Key)
	s.w.WriteByte('\t')
	s.w.Write(r.Value)
	if err := s.w.WriteByte('\n'); err != nil && s.err == nil {
		s.err = err
	}
}

// PreCommit flushes the output; the wait reports the first write error.
func (w *stdoutWriter) PreCommit(_ context.Context, checkpointID int64) (PreCommitted, error) {
	w.s.mu.Lock()
	err := w.s.flushLocked()
	w.s.mu.Unlock()
	if err != nil {
		err = fmt.Errorf("stdout sink: checkpoint %d of task %d: %w", checkpointID, w.task, err)
	}
	return donePreCommitted{err: err}, nil
}

// Commit does nothing.
func (w *stdoutWriter) Commit(context.Context, []Committable) error { return nil }

// Close flushes the output.
func (w *stdoutWriter) Close() {
	w.s.mu.Lock()
	w.s.flushLocked()
	w.s.mu.Unlock()
}

// Stats returns the writer's counters.
func (w *stdoutWriter) Stats() WriterStats { return w.stats.Stats() }

// donePreCommitted is a barrier that is already flushed.
type donePreCommitted struct{ err error }

// Wait returns at once.
func (d donePreCommitted) Wait(context.Context) (*Committable, error) { return nil, d.err }
