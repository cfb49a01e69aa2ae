// Package source owns Sluice's Kafka input: one franz-go client per instance
// that fetches the partitions of the tasks the instance runs, hands each task
// its records in order, resolves start positions, refuses to skip input that
// is gone, and commits offsets back to the consumer group for lag monitoring.
//
// A task is partition p of every (co-partitioned) input topic. Offsets are
// always concrete numbers: the start position (earliest or latest) is resolved
// once, when a task has no checkpoint, and from then on the checkpoint is the
// truth.
package source

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
)

// StartPosition says where a task without a checkpoint starts reading.
type StartPosition int

const (
	// Earliest starts at the log start offset.
	Earliest StartPosition = iota
	// Latest starts at the end of the log: only new records are read.
	Latest
)

// ParseStartPosition parses "earliest" or "latest".
func ParseStartPosition(s string) (StartPosition, error) {
	switch s {
	case "earliest":
		return Earliest, nil
	case "latest":
		return Latest, nil
	}
	return 0, fmt.Errorf("start position %q: want earliest or latest", s)
}

func (p StartPosition) String() string {
	if p == Latest {
		return "latest"
	}
	return "earliest"
}

// ErrInputGone means a task must read input that the broker no longer has
// (topic retention deleted it). Skipping it would lose data silently.
var ErrInputGone = errors.New("input needed for the task is gone from the broker")

// Config configures a Source.
type Config struct {
	// Brokers are the seed brokers.
	Brokers []string
	// Group is the consumer group (the job name) offsets are committed to.
	Group string
	// Topics are the co-partitioned input topics.
	Topics []string
	// Start applies to tasks that have no checkpoint.
	Start StartPosition
	// ReadUncommitted makes the source see records of open and aborted
	// transactions; off by default so a job can consume another job's
	// exactly-once output.
	ReadUncommitted bool
	// ConnectTimeout bounds the wait for the brokers at start (default 15 s).
	ConnectTimeout time.Duration
	// ClientOpts are added to the client's options (TLS, SASL, logger).
	ClientOpts []kgo.Opt
	// Logger receives operational logs; nil discards them.
	Logger *slog.Logger
}

// Batch is a run of records of one partition, in offset order, or the error
// that stopped fetching it.
type Batch struct {
	Records []*kgo.Record
	// HighWatermark is the partition's end offset as of this fetch, for
	// consumer lag.
	HighWatermark int64
	Err           error
}

// Inbox is the queue of batches of one assigned task.
type Inbox struct {
	// C delivers the task's batches.
	C    <-chan Batch
	c    chan Batch
	task int32
	done chan struct{}
	once sync.Once

	// While the task is behind (C full), its partitions are paused and a
	// flush goroutine hands it the batches already fetched, in order;
	// then the dispatcher resumes them. Guarded by mu.
	mu       sync.Mutex
	flushing bool
	backlog  []Batch
}

func (in *Inbox) close() { in.once.Do(func() { close(in.done) }) }

// Source fetches the input of the tasks assigned to this instance.
type Source struct {
	cfg        Config
	cl         *kgo.Client
	adm        *kadm.Client
	partitions int32
	log        *slog.Logger

	// Assign and release run on the dispatcher goroutine between two polls:
	// kgo drops buffered data of removed partitions, so no record fetched
	// for an older assignment can reach a newer inbox.
	ctl chan func()

	mu         sync.Mutex
	cancelPoll context.CancelFunc

	inboxes map[int32]*Inbox // owned by the dispatcher goroutine
}

// New connects to the brokers (bounded by ConnectTimeout) and checks that the
// input topics exist and are co-partitioned.
func New(ctx context.Context, cfg Config) (*Source, error) {
	if len(cfg.Brokers) == 0 {
		return nil, errors.New("source: no brokers given")
	}
	if len(cfg.Topics) == 0 {
		return nil, errors.New("source: no input topics")
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = 15 * time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	iso := kgo.ReadCommitted()
	if cfg.ReadUncommitted {
		iso = kgo.ReadUncommitted()
	}
	opts := append([]kgo.Opt{
		kgo.SeedBrokers(cfg.Brokers...),
		kgo.FetchIsolationLevel(iso),
		// Never reset silently: input that is gone must stop the task.
		kgo.ConsumeResetOffset(kgo.NoResetOffset()),
		kgo.FetchMaxWait(200 * time.Millisecond),
	}, cfg.ClientOpts...)
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, fmt.Errorf("source: %w", err)
	}
	s := &Source{cfg: cfg, cl: cl, adm: kadm.NewClient(cl), log: log, ctl: make(chan func(), 16), inboxes: map[int32]*Inbox{}}
	if err := s.discover(ctx); err != nil {
		cl.Close()
		return nil, err
	}
	return s, nil
}

// discover waits for the brokers and reads the input topics' partition counts.
func (s *Source) discover(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.ConnectTimeout)
	defer cancel()
	var lastErr error
	for {
		if err := s.cl.Ping(ctx); err != nil {
			lastErr = err
		} else if topics, err := s.adm.ListTopics(ctx, s.cfg.Topics...); err != nil {
			lastErr = err
		} else {
			return s.checkCoPartitioned(topics)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("cannot reach Kafka brokers %s within %s: %w", strings.Join(s.cfg.Brokers, ","), s.cfg.ConnectTimeout, lastErr)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func (s *Source) checkCoPartitioned(topics kadm.TopicDetails) error {
	for _, t := range s.cfg.Topics {
		d, ok := topics[t]
		if !ok || d.Err != nil {
			return fmt.Errorf("input topic %q does not exist (create it first)", t)
		}
		n := int32(len(d.Partitions))
		if s.partitions == 0 {
			s.partitions = n
		} else if n != s.partitions {
			return fmt.Errorf("input topics are not co-partitioned: %q has %d partitions, %q has %d",
				s.cfg.Topics[0], s.partitions, t, n)
		}
	}
	return nil
}

// Partitions is the number of partitions of every input topic: the job's
// number of tasks.
func (s *Source) Partitions() int32 { return s.partitions }

// Client is the instance's Kafka client, for admin requests of other parts.
func (s *Source) Client() *kgo.Client { return s.cl }

// StartOffsets resolves the start position of a task without a checkpoint
// into concrete offsets.
func (s *Source) StartOffsets(ctx context.Context, task int32) (map[string]int64, error) {
	list := s.adm.ListStartOffsets
	if s.cfg.Start == Latest {
		list = s.adm.ListEndOffsets
	}
	listed, err := list(ctx, s.cfg.Topics...)
	if err == nil {
		err = listed.Error()
	}
	if err != nil {
		return nil, fmt.Errorf("start offsets of task %d: %w", task, err)
	}
	out := make(map[string]int64, len(s.cfg.Topics))
	for _, t := range s.cfg.Topics {
		o, ok := listed.Lookup(t, task)
		if !ok {
			return nil, fmt.Errorf("start offsets of task %d: partition %s/%d not found", task, t, task)
		}
		out[t] = o.Offset
	}
	return out, nil
}

// CheckAvailable verifies that the broker still has the input from offsets
// on; otherwise it returns ErrInputGone with the details.
func (s *Source) CheckAvailable(ctx context.Context, task int32, offsets map[string]int64) error {
	listed, err := s.adm.ListStartOffsets(ctx, s.cfg.Topics...)
	if err == nil {
		err = listed.Error()
	}
	if err != nil {
		return fmt.Errorf("log start offsets of task %d: %w", task, err)
	}
	for _, t := range s.cfg.Topics {
		o, ok := listed.Lookup(t, task)
		if ok && offsets[t] < o.Offset {
			return fmt.Errorf("%w: task %d must read %s/%d from offset %d, but the log starts at %d (records deleted by retention)",
				ErrInputGone, task, t, task, offsets[t], o.Offset)
		}
	}
	return nil
}

// Assign starts fetching partition task of every input topic at the given
// next offsets and returns the inbox the task reads from. Every input topic
// must have an offset.
func (s *Source) Assign(ctx context.Context, task int32, offsets map[string]int64) (*Inbox, error) {
	add := map[string]map[int32]kgo.Offset{}
	for _, t := range s.cfg.Topics {
		o, ok := offsets[t]
		if !ok {
			return nil, fmt.Errorf("assign task %d: no offset for input topic %q", task, t)
		}
		add[t] = map[int32]kgo.Offset{task: kgo.NewOffset().At(o)}
	}
	c := make(chan Batch, 8)
	in := &Inbox{C: c, c: c, task: task, done: make(chan struct{})}
	// A caller that gives up (ctx done, e.g. its task was revoked during
	// its takeover) before the dispatcher got to the assignment withdraws
	// it: run later, it would register an inbox that nobody reads or
	// releases, and the dispatcher would block on it for good, and with it
	// every task of the instance.
	var (
		mu                 sync.Mutex
		applied, withdrawn bool
	)
	err := s.control(ctx, func() {
		mu.Lock()
		defer mu.Unlock()
		if withdrawn {
			return
		}
		applied = true
		if old := s.inboxes[task]; old != nil {
			old.close()
			s.cl.RemoveConsumePartitions(s.topicPartitions(task))
		}
		// A pause outlives the partitions' removal: clear it.
		s.cl.ResumeFetchPartitions(s.topicPartitions(task))
		s.inboxes[task] = in
		s.cl.AddConsumePartitions(add)
	})
	if err != nil {
		mu.Lock()
		defer mu.Unlock()
		if !applied {
			withdrawn = true
			return nil, fmt.Errorf("assign task %d: %w", task, err)
		}
		// It took effect after all: the caller owns the inbox (and must
		// release it).
	}
	return in, nil
}

// Release stops fetching for the task; its inbox is closed for delivery.
func (s *Source) Release(ctx context.Context, in *Inbox) error {
	in.close() // unblocks a dispatcher waiting to deliver to this inbox
	return s.control(ctx, func() {
		if s.inboxes[in.task] == in {
			delete(s.inboxes, in.task)
			s.cl.RemoveConsumePartitions(s.topicPartitions(in.task))
			s.cl.ResumeFetchPartitions(s.topicPartitions(in.task))
		}
	})
}

func (s *Source) topicPartitions(task int32) map[string][]int32 {
	m := make(map[string][]int32, len(s.cfg.Topics))
	for _, t := range s.cfg.Topics {
		m[t] = []int32{task}
	}
	return m
}

// control runs fn on the dispatcher goroutine and waits for it.
func (s *Source) control(ctx context.Context, fn func()) error {
	done := make(chan struct{})
	select {
	case s.ctl <- func() { fn(); close(done) }:
	case <-ctx.Done():
		return ctx.Err()
	}
	s.mu.Lock()
	if s.cancelPoll != nil {
		s.cancelPoll()
	}
	s.mu.Unlock()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Run is the dispatcher: it polls the client and hands every partition's
// records to its task's inbox until ctx is done. It never waits for a task:
// one that is behind has its partitions paused until it caught up (see
// deliver), so it cannot hold up the other tasks of the instance.
func (s *Source) Run(ctx context.Context) error {
	for {
		s.applyControl()
		pctx, cancel := context.WithCancel(ctx)
		s.mu.Lock()
		s.cancelPoll = cancel
		s.mu.Unlock()
		if len(s.ctl) > 0 { // arrived before cancelPoll was set
			cancel()
		}
		fetches := s.cl.PollFetches(pctx)
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		fetches.EachError(func(t string, p int32, err error) {
			if errors.Is(err, context.Canceled) || errors.Is(err, kgo.ErrClientClosed) {
				return
			}
			s.deliver(ctx, p, Batch{Err: fmt.Errorf("fetch %s/%d: %w", t, p, err)})
		})
		fetches.EachPartition(func(p kgo.FetchTopicPartition) {
			if len(p.Records) > 0 {
				s.deliver(ctx, p.Partition, Batch{Records: p.Records, HighWatermark: p.HighWatermark})
			}
		})
	}
}

func (s *Source) applyControl() {
	for {
		select {
		case fn := <-s.ctl:
			fn()
		default:
			return
		}
	}
}

// deliver hands b to its task's inbox without waiting. If the inbox is full
// the task is behind: its partitions are paused (kgo then neither fetches
// them nor hands out what it buffered of them, and fetches it again from
// the next offset once resumed), and a flush goroutine delivers b and
// whatever else was already fetched for the task, in order, as the task
// reads; then resume lets fetching go on.
func (s *Source) deliver(ctx context.Context, task int32, b Batch) {
	in := s.inboxes[task]
	if in == nil {
		return
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.flushing {
		in.backlog = append(in.backlog, b)
		return
	}
	select {
	case in.c <- b:
		return
	case <-in.done:
		return
	default:
	}
	s.cl.PauseFetchPartitions(s.topicPartitions(task))
	in.flushing = true
	in.backlog = append(in.backlog, b)
	go s.flush(ctx, in)
}

// flush delivers a paused task's backlog as the task reads it, then asks
// the dispatcher to resume the task's partitions. It ends early when the
// inbox is released or replaced (which clears the pause) or ctx is done.
func (s *Source) flush(ctx context.Context, in *Inbox) {
	for {
		in.mu.Lock()
		if len(in.backlog) == 0 {
			in.mu.Unlock()
			break
		}
		b := in.backlog[0]
		in.backlog = in.backlog[1:]
		in.mu.Unlock()
		select {
		case in.c <- b:
		case <-in.done:
			return
		case <-ctx.Done():
			return
		}
	}
	// On the dispatcher, so no batch for the task can come in between.
	_ = s.control(ctx, func() {
		if s.inboxes[in.task] != in {
			return // released or replaced: the pause is cleared already
		}
		in.mu.Lock()
		defer in.mu.Unlock()
		if len(in.backlog) > 0 { // fetched before the pause took effect
			go s.flush(ctx, in)
			return
		}
		in.flushing = false
		s.cl.ResumeFetchPartitions(s.topicPartitions(in.task))
	})
}

// CommitOffsets commits a task's checkpointed offsets to the consumer group,
// for lag monitoring only: on restore the checkpoint, not the group, is the
// truth.
func (s *Source) CommitOffsets(ctx context.Context, task int32, offsets map[string]int64) error {
	os := make(kadm.Offsets)
	for _, t := range slices.Sorted(maps.Keys(offsets)) {
		os.Add(kadm.Offset{Topic: t, Partition: task, At: offsets[t], LeaderEpoch: -1})
	}
	resp, err := s.adm.CommitOffsets(ctx, s.cfg.Group, os)
	if err == nil {
		err = resp.Error()
	}
	if err != nil {
		return fmt.Errorf("commit offsets of task %d to group %q: %w", task, s.cfg.Group, err)
	}
	return nil
}

// Close closes the client.
func (s *Source) Close() { s.cl.Close() }
