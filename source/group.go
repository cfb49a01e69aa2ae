package source

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// GroupConfig configures an instance's membership in its job's consumer
// group: Kafka is the distributed engine that spreads tasks over instances.
type GroupConfig struct {
	Brokers []string
	// Group is the job's name.
	Group string
	// Topics are the job's co-partitioned input topics.
	Topics []string
	// ServerSide uses the KIP-848 consumer protocol, where the broker
	// assigns partitions; otherwise the classic protocol with TaskBalancer.
	ServerSide bool
	// SessionTimeout and RebalanceTimeout are the group's (0: kgo defaults).
	SessionTimeout, RebalanceTimeout time.Duration
	ClientOpts                       []kgo.Opt
	Logger                           *slog.Logger

	// OnAssigned starts tasks newly assigned to this instance. It is called
	// after every assignment the group hands out, with no task if none is
	// new (the first call tells the instance it has joined).
	OnAssigned func(tasks []int32)
	// OnRevoked stops tasks gracefully before the group moves them; ctx
	// ends at the rebalance timeout.
	OnRevoked func(ctx context.Context, tasks []int32)
	// OnLost stops tasks at once: the session expired and another instance
	// may already run them.
	OnLost func(tasks []int32)
}

// Membership is this instance's membership in the job's consumer group. Its
// client never fetches (the Source does): it only takes part in rebalances
// and commits offsets as a group member.
type Membership struct {
	cfg GroupConfig
	cl  *kgo.Client
	log *slog.Logger

	mu    sync.Mutex
	owned map[string]map[int32]bool // topic → partitions assigned now
	tasks map[int32]bool            // tasks whose partitions of every topic are assigned
}

// JoinGroup joins the group; assignments arrive through the callbacks.
func JoinGroup(cfg GroupConfig) (*Membership, error) {
	if cfg.OnAssigned == nil || cfg.OnRevoked == nil || cfg.OnLost == nil {
		return nil, errors.New("join group: every callback must be set")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := &Membership{cfg: cfg, log: log, owned: map[string]map[int32]bool{}, tasks: map[int32]bool{}}
	opts := []kgo.Opt{
		kgo.SeedBrokers(cfg.Brokers...),
		kgo.ConsumerGroup(cfg.Group),
		kgo.ConsumeTopics(cfg.Topics...),
		kgo.DisableAutoCommit(),
		kgo.OnPartitionsAssigned(func(_ context.Context, _ *kgo.Client, ps map[string][]int32) { m.assigned(ps) }),
		kgo.OnPartitionsRevoked(func(ctx context.Context, _ *kgo.Client, ps map[string][]int32) { m.revoked(ctx, ps, false) }),
		kgo.OnPartitionsLost(func(ctx context.Context, _ *kgo.Client, ps map[string][]int32) { m.revoked(ctx, ps, true) }),
	}
	if cfg.ServerSide {
		opts = append(opts, kgo.ServerSideBalancer())
	} else {
		opts = append(opts, kgo.Balancers(TaskBalancer()))
	}
	if cfg.SessionTimeout > 0 {
		// Heartbeat at most a third of the session apart (Kafka's advice):
		// kgo's fixed 3 s default refuses sessions under 3 s and leaves a
		// 6 s session (a broker's usual minimum) two heartbeats of slack.
		opts = append(opts, kgo.SessionTimeout(cfg.SessionTimeout),
			kgo.HeartbeatInterval(min(3*time.Second, cfg.SessionTimeout/3)))
	}
	if cfg.RebalanceTimeout > 0 {
		opts = append(opts, kgo.RebalanceTimeout(cfg.RebalanceTimeout))
	}
	cl, err := kgo.NewClient(append(opts, cfg.ClientOpts...)...)
	if err != nil {
		return nil, fmt.Errorf("join group %s: %w", cfg.Group, err)
	}
	// The Source fetches; this client must not buffer records of its own.
	cl.PauseFetchTopics(cfg.Topics...)
	m.cl = cl
	return m, nil
}

// assigned records newly assigned partitions and starts the tasks that are
// now whole (partition p of every input topic).
func (m *Membership) assigned(ps map[string][]int32) {
	m.mu.Lock()
	for t, parts := range ps {
		if m.owned[t] == nil {
			m.owned[t] = map[int32]bool{}
		}
		for _, p := range parts {
			m.owned[t][p] = true
		}
	}
	var start []int32
	for p := range m.owned[m.cfg.Topics[0]] {
		if !m.tasks[p] && m.whole(p) {
			m.tasks[p] = true
			start = append(start, p)
		}
	}
	m.mu.Unlock()
	slices.Sort(start)
	if len(start) > 0 {
		m.log.Info("rebalance: tasks assigned", "tasks", start)
	}
	// Also when nothing starts: the instance knows the group has answered.
	m.cfg.OnAssigned(start)
}

func (m *Membership) whole(p int32) bool {
	for _, t := range m.cfg.Topics {
		if !m.owned[t][p] {
			return false
		}
	}
	return true
}

// revoked stops every task one of whose partitions is taken away.
func (m *Membership) revoked(ctx context.Context, ps map[string][]int32, lost bool) {
	m.mu.Lock()
	var stop []int32
	for t, parts := range ps {
		for _, p := range parts {
			delete(m.owned[t], p)
			if m.tasks[p] {
				delete(m.tasks, p)
				stop = append(stop, p)
			}
		}
	}
	m.mu.Unlock()
	if len(stop) == 0 {
		return
	}
	slices.Sort(stop)
	if lost {
		m.log.Warn("rebalance: tasks lost (session expired); stopping them without a final checkpoint", "tasks", stop)
		m.cfg.OnLost(stop)
		return
	}
	m.log.Info("rebalance: tasks revoked; final checkpoint before release", "tasks", stop)
	m.cfg.OnRevoked(ctx, stop)
}

// CommitOffsets commits a task's checkpointed offsets as a group member, for
// lag monitoring only.
func (m *Membership) CommitOffsets(ctx context.Context, task int32, offsets map[string]int64) error {
	commit := make(map[string]map[int32]kgo.EpochOffset, len(offsets))
	for t, o := range offsets {
		commit[t] = map[int32]kgo.EpochOffset{task: {Epoch: -1, Offset: o}}
	}
	var cerr error
	m.cl.CommitOffsetsSync(ctx, commit, func(_ *kgo.Client, _ *kmsg.OffsetCommitRequest, resp *kmsg.OffsetCommitResponse, err error) {
		if err == nil {
			for _, t := range resp.Topics {
				for _, p := range t.Partitions {
					if e := kerr.ErrorForCode(p.ErrorCode); e != nil && cerr == nil {
						cerr = e
					}
				}
			}
		}
		if cerr == nil {
			cerr = err
		}
	})
	if cerr != nil {
		return fmt.Errorf("commit offsets of task %d to group %q: %w", task, m.cfg.Group, cerr)
	}
	return nil
}

// Close leaves the group; the revoke callback stops the remaining tasks
// gracefully first.
func (m *Membership) Close() { m.cl.Close() }
