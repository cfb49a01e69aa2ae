package sink

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
	"github.com/twmb/franz-go/pkg/kversion"
)

// ErrTransactionLost means a pre-committed transaction was aborted (broker
// transaction timeout, broker crash, fencing by a new owner before it was
// committed): its records will never be visible and its input must be
// replayed from an older checkpoint.
var ErrTransactionLost = errors.New("sink: transaction lost (aborted by the broker)")

// Defaults of KafkaConfig.
const (
	DefaultTransactionalIDPrefix = "sluice"
	DefaultPoolSize              = 3
	DefaultTransactionTimeout    = 15 * time.Minute
	DefaultProgressPartitions    = 8
	// progressRetention is set on a progress topic the sink creates: a
	// marker must outlive any takeover that may need to read it.
	progressRetention = 7 * 24 * time.Hour
	// linger is small: output latency matters more than batch size, and
	// every barrier flushes anyway.
	linger = 5 * time.Millisecond
)

// KafkaConfig configures the Kafka sink of a job.
type KafkaConfig struct {
	// Brokers are the seed brokers (host:port).
	Brokers []string
	// Job is the job's name; it is part of every transactional id and of the
	// default progress topic.
	Job string
	// TransactionalIDPrefix starts every transactional id:
	// <prefix>-<job>-<task>-<slot>. Default "sluice".
	TransactionalIDPrefix string
	// PoolSize is the number of transactional ids per task, that is the
	// maximum number of pending (pre-committed, not yet committed)
	// checkpoints plus one. Default 3; at least 2.
	PoolSize int
	// TransactionTimeout is the producer's transaction timeout. It must not
	// exceed the broker's transaction.max.timeout.ms (checked by NewKafka).
	// Default 15m.
	TransactionTimeout time.Duration
	// ProgressTopic receives one progress marker per transaction. Default
	// "<job>-progress". Created if missing; it must not be compacted.
	ProgressTopic string
	// ProgressPartitions is the partition count used when the sink creates
	// the progress topic. Default 8. A task's markers go to partition
	// task % (actual partition count).
	ProgressPartitions int32
	// Delivery is the guarantee; the zero value is ExactlyOnce.
	Delivery Delivery
	// ClientOpts are extra options added to every client (SASL, TLS,
	// dialer, logger).
	ClientOpts []kgo.Opt
	// Logger receives the sink's logs. Default slog.Default().
	Logger *slog.Logger
}

// Kafka is the Kafka sink of a job: it creates the writers of its tasks and
// recovers the transactions a previous owner left pre-committed. It
// implements Sink.
type Kafka struct {
	cfg KafkaConfig
	log *slog.Logger

	// plain is a non-transactional client for admin and raw requests (EndTxn
	// to resume a transaction, InitProducerID to abort one).
	plain *kgo.Client
	adm   *kadm.Client

	// progressPartitions is the progress topic's actual partition count.
	progressPartitions int32
	// maxTxnTimeout is the broker's transaction.max.timeout.ms (smallest
	// over brokers); zero when not read (not exactly-once).
	maxTxnTimeout time.Duration
	// tv2 says the cluster runs transaction protocol v2 (KIP-890 part 2):
	// the epoch moves on every transaction.
	tv2 bool

	closeOnce sync.Once
}

var _ Sink = (*Kafka)(nil)

// legalTopic is Kafka's rule for topic names.
var legalTopic = regexp.MustCompile(`^[a-zA-Z0-9._-]{1,249}$`)

// normalize fills defaults and validates cfg.
func (cfg *KafkaConfig) normalize() error {
	var errs []error
	if len(cfg.Brokers) == 0 {
		errs = append(errs, errors.New("no brokers given"))
	}
	for _, b := range cfg.Brokers {
		if strings.TrimSpace(b) == "" {
			errs = append(errs, errors.New("empty broker address"))
			break
		}
	}
	if cfg.Job == "" {
		errs = append(errs, errors.New("job name is empty"))
	} else if strings.ContainsAny(cfg.Job, " \t\r\n") {
		errs = append(errs, fmt.Errorf("job name %q contains white space", cfg.Job))
	}
	if !cfg.Delivery.valid() {
		errs = append(errs, fmt.Errorf("invalid delivery %d", int(cfg.Delivery)))
	}
	if cfg.TransactionalIDPrefix == "" {
		cfg.TransactionalIDPrefix = DefaultTransactionalIDPrefix
	}
	if cfg.PoolSize == 0 {
		cfg.PoolSize = DefaultPoolSize
	}
	if cfg.PoolSize < 2 {
		errs = append(errs, fmt.Errorf("pool size %d: need at least 2 transactional ids per task (one open, one pending)", cfg.PoolSize))
	}
	if cfg.TransactionTimeout == 0 {
		cfg.TransactionTimeout = DefaultTransactionTimeout
	}
	if cfg.TransactionTimeout < time.Millisecond || cfg.TransactionTimeout.Milliseconds() > math.MaxInt32 {
		errs = append(errs, fmt.Errorf("transaction timeout %v out of range (1ms to %v)", cfg.TransactionTimeout, time.Duration(math.MaxInt32)*time.Millisecond))
	}
	if cfg.ProgressTopic == "" && cfg.Job != "" {
		cfg.ProgressTopic = cfg.Job + "-progress"
	}
	if cfg.Delivery == ExactlyOnce && cfg.Job != "" && !legalTopic.MatchString(cfg.ProgressTopic) {
		errs = append(errs, fmt.Errorf("progress topic %q is not a legal Kafka topic name (letters, digits, '.', '_', '-'; at most 249)", cfg.ProgressTopic))
	}
	if cfg.ProgressPartitions == 0 {
		cfg.ProgressPartitions = DefaultProgressPartitions
	}
	if cfg.ProgressPartitions < 0 {
		errs = append(errs, fmt.Errorf("progress partitions %d is negative", cfg.ProgressPartitions))
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if len(errs) > 0 {
		return fmt.Errorf("kafka sink config: %w", errors.Join(errs...))
	}
	return nil
}

// NewKafka validates cfg and connects. For exactly-once it also checks the
// transaction timeout against the broker's transaction.max.timeout.ms and
// creates the progress topic if it is missing.
func NewKafka(ctx context.Context, cfg KafkaConfig) (*Kafka, error) {
	cfg.Brokers = append([]string(nil), cfg.Brokers...)
	cfg.ClientOpts = append([]kgo.Opt(nil), cfg.ClientOpts...)
	if err := cfg.normalize(); err != nil {
		return nil, err
	}
	k := &Kafka{
		cfg: cfg,
		log: cfg.Logger.With("component", "sink", "job", cfg.Job, "delivery", cfg.Delivery.String()),
	}
	plain, err := kgo.NewClient(k.plainOpts()...)
	if err != nil {
		return nil, fmt.Errorf("kafka sink: client: %w", err)
	}
	k.plain = plain
	if err := k.start(ctx); err != nil {
		k.plain.Close()
		return nil, fmt.Errorf("kafka sink of job %s: %w", cfg.Job, err)
	}
	k.adm = kadm.NewClient(k.plain)
	return k, nil
}

// start does NewKafka's broker round trips.
func (k *Kafka) start(ctx context.Context) error {
	tv2, err := k.transactionV2(ctx)
	if err != nil {
		if k.cfg.Delivery == ExactlyOnce {
			return err
		}
		k.log.Warn("cannot read the cluster's features", "err", err)
	}
	k.tv2 = tv2
	if !tv2 && k.cfg.Delivery == ExactlyOnce {
		// EndTxn v5 belongs to transaction protocol v2; a resumed commit
		// must speak the protocol the transaction was opened with, as
		// kgo's own producer does.
		v := kversion.Stable()
		v.SetMaxKeyVersion(int16(kmsg.EndTxn), 4)
		capped, err := kgo.NewClient(append(k.plainOpts(), kgo.MaxVersions(v))...)
		if err != nil {
			return err
		}
		k.plain.Close()
		k.plain = capped
		k.log.Warn("cluster does not run transaction protocol v2 (KIP-890): a zombie that reuses a pool id in the same producer epoch could have a resumed commit applied to its transaction; upgrade the cluster's transaction.version to 2")
	}
	adm := kadm.NewClient(k.plain)
	if k.cfg.Delivery != ExactlyOnce {
		return nil
	}
	if k.maxTxnTimeout, err = brokerTxnMaxTimeout(ctx, adm); err != nil {
		return err
	}
	if k.cfg.TransactionTimeout > k.maxTxnTimeout {
		return fmt.Errorf("transaction timeout %v (%d ms) is larger than the broker's transaction.max.timeout.ms %v (%d ms): lower the sink's transaction timeout or raise the broker setting",
			k.cfg.TransactionTimeout, k.cfg.TransactionTimeout.Milliseconds(), k.maxTxnTimeout, k.maxTxnTimeout.Milliseconds())
	}
	if k.progressPartitions, err = ensureProgressTopic(ctx, adm, k.cfg.ProgressTopic, k.cfg.ProgressPartitions, k.log); err != nil {
		return err
	}
	return nil
}

// opts are the options every client of the sink starts from.
func (k *Kafka) opts() []kgo.Opt {
	opts := []kgo.Opt{kgo.SeedBrokers(k.cfg.Brokers...)}
	return append(opts, k.cfg.ClientOpts...)
}

// plainOpts are the options of the admin client. Its metadata is cached
// briefly only: a progress topic the sink just created must not stay
// "unknown" for kgo's default 5s.
func (k *Kafka) plainOpts() []kgo.Opt {
	return append(k.opts(), kgo.MetadataMinAge(100*time.Millisecond))
}

// transactionV2 reports whether the cluster finalized transaction.version >= 2.
func (k *Kafka) transactionV2(ctx context.Context) (bool, error) {
	resp, err := kmsg.NewPtrApiVersionsRequest().RequestWith(ctx, k.plain)
	if err != nil {
		return false, fmt.Errorf("api versions: %w", err)
	}
	if err := kerr.ErrorForCode(resp.ErrorCode); err != nil {
		return false, fmt.Errorf("api versions: %w", err)
	}
	for _, f := range resp.FinalizedFeatures {
		if f.Name == "transaction.version" && f.MaxVersionLevel >= 2 {
			return true, nil
		}
	}
	return false, nil
}

// brokerTxnMaxTimeout reads transaction.max.timeout.ms of every broker and
// returns the smallest.
func brokerTxnMaxTimeout(ctx context.Context, adm *kadm.Client) (time.Duration, error) {
	brokers, err := adm.ListBrokers(ctx)
	if err != nil {
		return 0, fmt.Errorf("list brokers: %w", err)
	}
	rcs, err := adm.DescribeBrokerConfigs(ctx, brokers.NodeIDs()...)
	if err != nil {
		return 0, fmt.Errorf("describe broker configs (to read transaction.max.timeout.ms): %w", err)
	}
	var least time.Duration
	for _, rc := range rcs {
		if rc.Err != nil {
			return 0, fmt.Errorf("describe config of broker %s: %w", rc.Name, rc.Err)
		}
		for _, c := range rc.Configs {
			if c.Key != "transaction.max.timeout.ms" || c.Value == nil {
				continue
			}
			ms, err := strconv.ParseInt(*c.Value, 10, 64)
			if err != nil {
				return 0, fmt.Errorf("broker %s: transaction.max.timeout.ms %q: %w", rc.Name, *c.Value, err)
			}
			if d := time.Duration(ms) * time.Millisecond; least == 0 || d < least {
				least = d
			}
		}
	}
	if least == 0 {
		return 0, errors.New("no broker reported transaction.max.timeout.ms")
	}
	return least, nil
}

// ensureProgressTopic creates the progress topic if it is missing and
// returns its partition count.
func ensureProgressTopic(ctx context.Context, adm *kadm.Client, topic string, partitions int32, log *slog.Logger) (int32, error) {
	created := false
	for attempt := 0; ; attempt++ {
		tds, err := adm.ListTopics(ctx, topic)
		if err != nil {
			return 0, fmt.Errorf("describe progress topic %s: %w", topic, err)
		}
		td, ok := tds[topic]
		if ok && td.Err == nil && len(td.Partitions) > 0 {
			if err := checkNotCompacted(ctx, adm, topic, log); err != nil {
				return 0, err
			}
			return int32(len(td.Partitions)), nil
		}
		if ok && td.Err != nil && !errors.Is(td.Err, kerr.UnknownTopicOrPartition) {
			return 0, fmt.Errorf("describe progress topic %s: %w", topic, td.Err)
		}
		if !created {
			retention := strconv.FormatInt(progressRetention.Milliseconds(), 10)
			resp, err := adm.CreateTopic(ctx, partitions, -1, map[string]*string{
				"cleanup.policy": kadm.StringPtr("delete"),
				"retention.ms":   kadm.StringPtr(retention),
			}, topic)
			if err != nil && !errors.Is(err, kerr.TopicAlreadyExists) {
				return 0, fmt.Errorf("create progress topic %s: %w", topic, err)
			}
			if err == nil {
				log.Info("created progress topic", "topic", topic, "partitions", partitions)
				if resp.NumPartitions > 0 {
					return resp.NumPartitions, nil
				}
			}
			created = true
		}
		// Another instance created it, or an old broker did not say how:
		// kgo caches metadata briefly, so this can take a few seconds.
		if err := sleepCtx(ctx, backoff(attempt)); err != nil {
			return 0, fmt.Errorf("progress topic %s not visible after creating it: %w", topic, err)
		}
	}
}

// checkNotCompacted refuses a compacted progress topic: compaction keeps
// only the newest marker of a key, and a marker that disappeared would read
// as a lost transaction.
func checkNotCompacted(ctx context.Context, adm *kadm.Client, topic string, log *slog.Logger) error {
	rcs, err := adm.DescribeTopicConfigs(ctx, topic)
	if err == nil {
		var rc kadm.ResourceConfig
		if rc, err = rcs.On(topic, nil); err == nil {
			err = rc.Err
		}
		for _, c := range rc.Configs {
			if c.Key == "cleanup.policy" && c.Value != nil && strings.Contains(*c.Value, "compact") {
				return fmt.Errorf("progress topic %s has cleanup.policy=%s: it must be delete (compaction removes the markers that tell committed from lost transactions)", topic, *c.Value)
			}
		}
	}
	if err != nil {
		log.Warn("cannot check the progress topic's cleanup.policy", "topic", topic, "err", err)
	}
	return nil
}

// BrokerTransactionMaxTimeout returns the brokers' transaction.max.timeout.ms
// (the smallest if they differ), read by NewKafka; zero if the sink is not
// exactly-once. The checkpoint coordinator fails a checkpoint whose oldest
// pending transaction could reach it.
func (k *Kafka) BrokerTransactionMaxTimeout() time.Duration { return k.maxTxnTimeout }

// TransactionTimeout returns the transaction timeout the producers use.
func (k *Kafka) TransactionTimeout() time.Duration { return k.cfg.TransactionTimeout }

// ProgressTopic returns the topic the progress markers go to.
func (k *Kafka) ProgressTopic() string { return k.cfg.ProgressTopic }

// TransactionalID returns the transactional id of slot of task's pool.
func (k *Kafka) TransactionalID(task int32, slot int) string {
	return fmt.Sprintf("%s-%s-%d-%d", k.cfg.TransactionalIDPrefix, k.cfg.Job, task, slot)
}

// idPattern matches the transactional ids of this job; the groups are the
// task and the slot.
func (k *Kafka) idPattern() string {
	return "^" + regexp.QuoteMeta(k.cfg.TransactionalIDPrefix+"-"+k.cfg.Job+"-") + `(\d+)-(\d+)$`
}

// NewWriter creates the writer of task. For exactly-once it fences every
// transactional id of the task's pool (InitProducerID, which aborts what a
// previous owner left open) and aborts open transactions of the task's ids
// outside the pool (a previous, larger pool).
func (k *Kafka) NewWriter(ctx context.Context, task int32) (Writer, error) {
	if task < 0 {
		return nil, fmt.Errorf("new writer: negative task %d", task)
	}
	switch k.cfg.Delivery {
	case ExactlyOnce:
		w, err := newTxnWriter(ctx, k, task)
		if err != nil {
			return nil, fmt.Errorf("new writer of task %d: %w", task, err)
		}
		return w, nil
	default:
		// A job switched from exactly-once leaves open transactions that
		// pin the last stable offset of read_committed readers; clear
		// them, but do not require the ACL for it.
		if err := k.abortMatching(ctx, func(t int32, _ int) bool { return t == task }); err != nil {
			k.log.Warn("cannot look for open transactions of a previous exactly-once run", "task", task, "err", err)
		}
		w, err := newPlainWriter(k, task)
		if err != nil {
			return nil, fmt.Errorf("new writer of task %d: %w", task, err)
		}
		return w, nil
	}
}

// AbortOrphans aborts open transactions of this job's tasks numbered
// numTasks or more (found with ListTransactions): after the input lost
// partitions, nobody owns those tasks and their transactions would pin the
// last stable offset until they time out. Harmless if there are none.
func (k *Kafka) AbortOrphans(ctx context.Context, numTasks int32) error {
	if numTasks < 0 {
		return fmt.Errorf("abort orphan transactions of job %s: negative task count %d", k.cfg.Job, numTasks)
	}
	if err := k.abortMatching(ctx, func(t int32, _ int) bool { return t >= numTasks }); err != nil {
		return fmt.Errorf("abort orphan transactions of job %s (tasks >= %d): %w", k.cfg.Job, numTasks, err)
	}
	return nil
}

// abortMatching aborts every open transaction of the job's ids whose task
// and slot satisfy match.
func (k *Kafka) abortMatching(ctx context.Context, match func(task int32, slot int) bool) error {
	re := regexp.MustCompile(k.idPattern())
	// The pattern filter needs Kafka 4.1; older brokers list everything and
	// we filter here.
	list, err := k.adm.ListTransactionsByTxPattern(ctx, nil, []string{"Ongoing"}, k.idPattern())
	if err != nil {
		return fmt.Errorf("list transactions: %w", err)
	}
	for _, id := range list.TransactionalIDs() {
		lt := list[id]
		if lt.State != "Ongoing" {
			continue
		}
		m := re.FindStringSubmatch(id)
		if m == nil {
			continue
		}
		task, err1 := strconv.ParseInt(m[1], 10, 32)
		slot, err2 := strconv.Atoi(m[2])
		if err1 != nil || err2 != nil || !match(int32(task), slot) {
			continue
		}
		if err := k.abortTransactionalID(ctx, id); err != nil {
			return err
		}
		k.log.Info("aborted lingering transaction", "transactional_id", id, "producer_id", lt.ProducerID)
	}
	return nil
}

// abortTransactionalID aborts whatever transaction id has open, the way a
// new producer does: InitProducerID bumps the epoch and the coordinator
// aborts the open transaction. It returns once the abort is complete (the
// coordinator answers CONCURRENT_TRANSACTIONS until then).
func (k *Kafka) abortTransactionalID(ctx context.Context, id string) error {
	for attempt := 0; ; attempt++ {
		req := kmsg.NewPtrInitProducerIDRequest()
		req.TransactionalID = kmsg.StringPtr(id)
		req.TransactionTimeoutMillis = int32(k.cfg.TransactionTimeout.Milliseconds())
		req.ProducerID = -1
		req.ProducerEpoch = -1
		resp, err := req.RequestWith(ctx, k.plain)
		if err == nil {
			err = kerr.ErrorForCode(resp.ErrorCode)
			if err == nil {
				return nil
			}
		}
		if ctx.Err() != nil || !retriable(err) {
			return fmt.Errorf("abort transactional id %s: %w", id, err)
		}
		if err := sleepCtx(ctx, backoff(attempt)); err != nil {
			return fmt.Errorf("abort transactional id %s: %w", id, err)
		}
	}
}

// Close releases the shared client. Close the sink after its writers: they
// resolve ambiguous commits through it.
func (k *Kafka) Close() {
	k.closeOnce.Do(func() { k.plain.Close() })
}

// retriable reports whether err is worth retrying: a retriable Kafka error,
// CONCURRENT_TRANSACTIONS (a transaction is completing), or a transport
// error. Other Kafka errors are answers.
func retriable(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, kgo.ErrClientClosed) {
		return false
	}
	if ke, ok := errors.AsType[*kerr.Error](err); ok {
		return ke.Retriable || ke == kerr.ConcurrentTransactions
	}
	return true
}

// isFenced reports whether err says another producer took the
// transactional id.
func isFenced(err error) bool {
	return errors.Is(err, kerr.ProducerFenced) || errors.Is(err, kerr.InvalidProducerEpoch) || errors.Is(err, ErrFenced)
}

// backoff is the pause before retry attempt (from 0): 50ms doubling to 1s.
func backoff(attempt int) time.Duration {
	d := 50 * time.Millisecond
	for i := 0; i < attempt && d < time.Second; i++ {
		d *= 2
	}
	return min(d, time.Second)
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
