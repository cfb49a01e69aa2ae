// Package operators owns Sluice's typed dataflow API and the in-task operator
// chain.
//
// A user builds a Job once, at start-up, from sources (FromKafka), stateless
// operators (Map, MapErr, Filter, FlatMap, Merge), keyed stateful operators
// (KeyBy + Process) and sinks (ToKafka). The runtime then calls Job.Build once
// per task (one partition index of the job's input topics) and feeds every
// input record of that task to the returned Chain. All operators of a task run
// chained in the task's goroutine and pass records by plain function call: a
// checkpoint barrier, which the runtime injects between two Chain calls, is
// therefore aligned by construction and there is nothing in flight to snapshot.
//
// The graph is made of typed closures that Build instantiates once per task,
// so the per-record path uses neither reflection, nor channels, nor maps.
package operators

import (
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"
)

// maxNameLen is Kafka's limit on topic names. Job names and operator uids
// share it: they become consumer group ids, transactional id parts and path
// components of checkpoint storage, where shorter is safer.
const maxNameLen = 249

// Job is a named dataflow under construction and, once complete, the factory
// of its tasks' operator chains.
//
// Define the whole graph from one goroutine before the first call to Build;
// after that a Job is read-only and Build may be called concurrently for
// different tasks. Mistakes made while defining the graph (a bad topic name,
// a duplicate uid, a nil function) do not panic: they are collected and
// reported by Validate, which Build also calls.
type Job struct {
	name    string
	errs    []error
	sources []source
	// streams holds every stream of the graph so Validate can find the ones
	// nothing consumes.
	streams []streamInfo
	// outputs are the sink topics in order of definition (may repeat).
	outputs []string
	// uids are the stateful operators' ids in order of definition.
	uids []string
	// deadLetter is the dead-letter topic; empty means fail on bad input.
	deadLetter string
	// deadLetters counts records this process sent to the dead-letter topic.
	deadLetters atomic.Int64
}

// NewJob starts the definition of a job. The name is the job's consumer group
// id and the root folder of its checkpoints and savepoints, so it must be a
// non-empty [A-Za-z0-9._-]+ of at most 249 characters and neither "." nor
// "..". An invalid name is reported by Validate.
func NewJob(name string) *Job {
	j := &Job{name: name}
	if err := checkName("job name", name); err != nil {
		j.errs = append(j.errs, err)
	}
	return j
}

// Name returns the job's name: its consumer group id and storage root.
func (j *Job) Name() string { return j.name }

// ErrorPolicy says what a task does with an input record its source's
// Deserializer rejects. Build one with Fail or DeadLetter.
type ErrorPolicy struct {
	deadLetter string
}

// Fail is the default policy: the task stops with a *RecordError naming the
// record's topic, partition and offset. Nothing is skipped silently, and
// after a fix of the code or of the data the task resumes from its last
// checkpoint.
func Fail() ErrorPolicy { return ErrorPolicy{} }

// DeadLetter sends each rejected record's original key, value and headers to
// topic, with the headers sluice.error, sluice.topic, sluice.partition and
// sluice.offset added, and goes on with the next record. The dead letter is
// written through the task's own sink.Writer, so it is committed exactly once
// together with the task's other output of the same checkpoint.
func DeadLetter(topic string) ErrorPolicy { return ErrorPolicy{deadLetter: topic} }

// OnDeserializeError sets the job's policy for records that a source's
// Deserializer rejects. The default is Fail().
func (j *Job) OnDeserializeError(p ErrorPolicy) {
	if p.deadLetter != "" {
		if err := checkName("dead-letter topic", p.deadLetter); err != nil {
			j.fail(err)
			return
		}
	}
	j.deadLetter = p.deadLetter
}

// DeadLetters returns the number of records this process has sent to the
// dead-letter topic, over all tasks of the job. It is a monitoring counter:
// records replayed after a restore are counted again.
func (j *Job) DeadLetters() int64 { return j.deadLetters.Load() }

// Inputs returns the job's input topics, without duplicates, in order of
// definition. The runtime subscribes to them; partition p of each is task p.
func (j *Job) Inputs() []string {
	topics := make([]string, 0, len(j.sources))
	for _, s := range j.sources {
		topics = appendUnique(topics, s.topic)
	}
	return topics
}

// Outputs returns every topic the job writes to, without duplicates: the sink
// topics in order of definition, then the dead-letter topic if one is set.
func (j *Job) Outputs() []string {
	topics := make([]string, 0, len(j.outputs)+1)
	for _, t := range j.outputs {
		topics = appendUnique(topics, t)
	}
	if j.deadLetter != "" {
		topics = appendUnique(topics, j.deadLetter)
	}
	return topics
}

// Operators returns the uids of the job's stateful operators in order of
// definition. A restore maps saved state to operators by these ids.
func (j *Job) Operators() []string {
	return append([]string(nil), j.uids...)
}

// Validate reports every mistake in the job's definition: an invalid name,
// topic or uid, a nil function, a duplicate uid, a job without source or sink,
// a stream whose records nothing consumes, a dead-letter topic that is also
// an input (a bad record would come back forever).
func (j *Job) Validate() error {
	errs := append([]error(nil), j.errs...)
	if len(j.sources) == 0 {
		errs = append(errs, errors.New("job has no source: add one with FromKafka"))
	}
	if len(j.outputs) == 0 {
		errs = append(errs, errors.New("job has no sink: add one with ToKafka"))
	}
	for _, s := range j.streams {
		if s.consumers() == 0 {
			errs = append(errs, fmt.Errorf("stream created by %s is never consumed", s.origin()))
		}
	}
	for _, t := range j.Inputs() {
		if t == j.deadLetter {
			errs = append(errs, fmt.Errorf("dead-letter topic %q is also an input of the job", t))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("job %q: %w", j.name, err)
	}
	return nil
}

// fail records a definition mistake for Validate.
func (j *Job) fail(err error) { j.errs = append(j.errs, err) }

// addUID registers a stateful operator's id, rejecting invalid and duplicate
// ones: two operators under one id would read and overwrite each other's
// state, and a restore could not tell them apart.
func (j *Job) addUID(uid string) {
	if err := checkName("operator uid", uid); err != nil {
		j.fail(err)
		return
	}
	for _, u := range j.uids {
		if u == uid {
			j.fail(fmt.Errorf("operator uid %q is used twice", uid))
			return
		}
	}
	j.uids = append(j.uids, uid)
}

// checkName accepts Kafka's legal topic names, which are also safe as group
// ids, transactional id parts and path components: [A-Za-z0-9._-]+, at most
// 249 characters, and not "." or ".." (which would escape a storage folder).
func checkName(what, s string) error {
	switch {
	case s == "":
		return fmt.Errorf("%s is empty", what)
	case len(s) > maxNameLen:
		return fmt.Errorf("%s %.20q... is longer than %d characters", what, s, maxNameLen)
	case s == "." || s == "..":
		return fmt.Errorf("%s %q is not allowed", what, s)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("%s %q has character %q: only [A-Za-z0-9._-] is allowed", what, s, c)
		}
	}
	return nil
}

func appendUnique(list []string, s string) []string {
	for _, x := range list {
		if x == s {
			return list
		}
	}
	return append(list, s)
}

// caller describes where in the user's code the API function fn was called,
// so that Validate can point at the line that created an unused stream.
func caller(fn string) string {
	// Skip caller itself and the API function that called it.
	if _, file, line, ok := runtime.Caller(2); ok {
		return fmt.Sprintf("%s at %s:%d", fn, file, line)
	}
	return fn
}
