package service

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/sluice-stream/sluice/coordinator"
)

// ControlTopic is the topic through which the savepoint command reaches
// every instance of a job: one partition of JSON savepoint requests.
func ControlTopic(job string) string { return "_sluice-control-" + job }

// ensureControlTopic creates the job's control topic if it is missing.
func ensureControlTopic(ctx context.Context, adm *kadm.Client, job string) error {
	topic := ControlTopic(job)
	resp, err := adm.CreateTopic(ctx, 1, -1, nil, topic)
	if err == nil {
		err = resp.Err
	}
	if err != nil && !errors.Is(err, kerr.TopicAlreadyExists) {
		return fmt.Errorf("create control topic %s: %w", topic, err)
	}
	return nil
}

// control reads savepoint requests from the job's control topic, from its
// end when the process started (older requests were meant for earlier
// deployments), and hands them to the instance.
type control struct {
	cl  *kgo.Client
	log *slog.Logger
}

// openControl creates the control topic if needed and positions a reader
// at its current end.
func openControl(ctx context.Context, brokers []string, job string, log *slog.Logger) (*control, error) {
	adminCl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		return nil, fmt.Errorf("control topic: %w", err)
	}
	defer adminCl.Close()
	adm := kadm.NewClient(adminCl)
	if err := ensureControlTopic(ctx, adm, job); err != nil {
		return nil, err
	}
	topic := ControlTopic(job)
	ends, err := adm.ListEndOffsets(ctx, topic)
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		return nil, fmt.Errorf("control topic %s: end offset: %w", topic, err)
	}
	end, ok := ends.Lookup(topic, 0)
	if !ok {
		return nil, fmt.Errorf("control topic %s: no partition 0", topic)
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: {0: kgo.NewOffset().At(end.Offset)}}))
	if err != nil {
		return nil, fmt.Errorf("control topic %s: %w", topic, err)
	}
	return &control{cl: cl, log: log}, nil
}

// run passes every valid request to in until ctx is done.
func (c *control) run(ctx context.Context, in *coordinator.Instance) {
	for {
		fs := c.cl.PollFetches(ctx)
		if ctx.Err() != nil {
			return
		}
		fs.EachError(func(t string, p int32, err error) {
			c.log.Warn("control topic fetch failed; retrying", "topic", t, "err", err)
		})
		fs.EachRecord(func(r *kgo.Record) {
			var req coordinator.SavepointRequest
			if err := json.Unmarshal(r.Value, &req); err != nil {
				c.log.Warn("ignoring unreadable control record", "offset", r.Offset, "err", err)
				return
			}
			if err := req.Validate(); err != nil {
				c.log.Warn("ignoring invalid control record", "offset", r.Offset, "err", err)
				return
			}
			in.RequestSavepoint(req)
		})
	}
}

func (c *control) close() { c.cl.Close() }

// locations opens savepoint and import locations, once each: opening an S3
// location probes its conditional writes.
type locations struct {
	opts coordinator.StorageOptions
	mu   sync.Mutex
	open map[string]coordinator.Storage
}

// Open returns the storage at loc, opening it on first use.
func (l *locations) Open(ctx context.Context, loc string) (coordinator.Storage, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if st, ok := l.open[loc]; ok {
		return st, nil
	}
	st, err := coordinator.OpenStorage(ctx, loc, l.opts)
	if err != nil {
		return nil, err
	}
	if l.open == nil {
		l.open = map[string]coordinator.Storage{}
	}
	l.open[loc] = st
	return st, nil
}
