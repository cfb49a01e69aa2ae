package sink

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// progressMarker is the value of a progress marker record. Its key is
// "task-<task>".
type progressMarker struct {
	Task            int32  `json:"task"`
	Checkpoint      int64  `json:"checkpoint"`
	TransactionalID string `json:"transactional_id"`
}

// Recover commits committables recorded by a previous owner of task, in
// order, by resuming their transactions with a raw EndTxn (kgo cannot resume
// a transaction by producer id and epoch). Whatever EndTxn answers, the
// outcome is read from the progress marker. After the first Lost the
// remaining committables are reported Lost without being committed, so the
// committed transactions stay a prefix; NewWriter's fencing aborts them.
// On error the outcomes decided so far are returned.
func (k *Kafka) Recover(ctx context.Context, task int32, cs []Committable) ([]Outcome, error) {
	outs := make([]Outcome, 0, len(cs))
	lost := false
	for _, c := range cs {
		log := k.log.With("task", task, "checkpoint", c.CheckpointID, "transactional_id", c.TransactionalID,
			"producer_id", c.ProducerID, "epoch", c.Epoch)
		if lost {
			outs = append(outs, Lost)
			log.Warn("recovered transaction reported lost without committing it: an earlier one is lost")
			continue
		}
		out, err := k.resolve(ctx, task, c)
		if err != nil {
			return outs, fmt.Errorf("recover checkpoint %d of task %d: %w", c.CheckpointID, task, err)
		}
		outs = append(outs, out)
		if out == Lost {
			lost = true
			log.Error("recovered transaction is lost: it was aborted, its input must be replayed", "outcome", out)
		} else {
			log.Info("recovered transaction", "outcome", out)
		}
	}
	return outs, nil
}

// validate rejects a committable that cannot name a transaction.
func (c *Committable) validate() error {
	switch {
	case c.TransactionalID == "":
		return errors.New("committable has no transactional id")
	case c.ProducerID < 0 || c.Epoch < 0:
		return fmt.Errorf("committable has invalid producer id %d / epoch %d", c.ProducerID, c.Epoch)
	case c.Marker.Topic == "" || c.Marker.Partition < 0 || c.Marker.Offset < 0:
		return fmt.Errorf("committable has invalid marker %+v", c.Marker)
	}
	return nil
}

// resolve commits c's transaction if it is still open and returns what
// became of it, as its progress marker tells. It loops until the marker
// decides or ctx ends. EndTxn is sent only while the transaction is open
// (and repeated only after a retriable answer), so a transaction already
// decided is never touched; whatever EndTxn answers, the marker decides.
func (k *Kafka) resolve(ctx context.Context, task int32, c Committable) (Outcome, error) {
	if err := c.validate(); err != nil {
		return 0, err
	}
	log := k.log.With("task", task, "checkpoint", c.CheckpointID, "transactional_id", c.TransactionalID)
	var (
		sent    bool  // an EndTxn was answered
		answer  error // its answer
		lastErr error
	)
	for attempt := 0; ; attempt++ {
		if attempt > 0 {
			if err := sleepCtx(ctx, backoff(attempt-1)); err != nil {
				return 0, fmt.Errorf("transaction %s still undecided (no end marker after its progress marker at %s; last EndTxn answer %s; last error %v): %w",
					c.TransactionalID, c.Marker, errString(answer), lastErr, err)
			}
		}
		out, decided, err := k.scanMarker(ctx, c.Marker, task, c.CheckpointID)
		switch {
		case err != nil && isPermanent(err):
			return 0, err
		case err != nil:
			lastErr = err
			log.Debug("cannot read the progress marker yet", "err", err)
			continue
		case decided:
			return out, nil
		}
		if sent && !retriable(answer) {
			// Answered but still open: a commit's markers are being
			// written, or a fenced or timed-out transaction is being
			// aborted. Wait for the end marker.
			continue
		}
		answer, sent = k.endTxn(ctx, c), true
		log.Info("resumed transaction commit", "answer", errString(answer), "attempt", attempt)
	}
}

// errPermanent marks resolution errors that waiting cannot cure.
type errPermanent struct{ error }

func (e errPermanent) Unwrap() error { return e.error }

func permanent(format string, args ...any) error {
	return errPermanent{fmt.Errorf(format, args...)}
}

func isPermanent(err error) bool {
	_, ok := errors.AsType[errPermanent](err)
	return ok
}

// endTxn sends EndTxn(commit) for c's transaction through the plain client.
func (k *Kafka) endTxn(ctx context.Context, c Committable) error {
	req := kmsg.NewPtrEndTxnRequest()
	req.TransactionalID = c.TransactionalID
	req.ProducerID = c.ProducerID
	req.ProducerEpoch = c.Epoch
	req.Commit = true
	resp, err := req.RequestWith(ctx, k.plain)
	if err != nil {
		return err
	}
	return kerr.ErrorForCode(resp.ErrorCode)
}

// resolveMarker waits until the transaction that wrote the progress marker at
// ref is decided and says whether it committed (see scanMarker). ctx bounds
// the wait: an undecided transaction is an error, never a guess.
func (k *Kafka) resolveMarker(ctx context.Context, ref MarkerRef, task int32, checkpointID int64) (Outcome, error) {
	var lastErr error
	for attempt := 0; ; attempt++ {
		if attempt > 0 {
			if err := sleepCtx(ctx, backoff(attempt-1)); err != nil {
				return 0, fmt.Errorf("read marker at %s: undecided: %w", ref, errors.Join(err, lastErr))
			}
		}
		out, decided, err := k.scanMarker(ctx, ref, task, checkpointID)
		switch {
		case err != nil && isPermanent(err):
			return 0, err
		case err != nil:
			lastErr = err
		case decided:
			return out, nil
		default:
			lastErr = errors.New("transaction still open")
		}
	}
}

// scanMarker reads ref's partition from the marker on, without isolation,
// keeping control records, up to the high watermark. The marker's producer
// ends its transaction in that partition with one control record, after the
// marker: COMMIT means the transaction committed (the marker is visible to
// read_committed readers), ABORT that it is lost. No such record yet means
// the transaction is open (decided is false).
//
// This is decided by the transaction's own end marker, so it needs no record
// after the marker to be written (the marker may be the partition's last
// record), and it does not wait on other producers' open transactions the
// way a read_committed read would (its last stable offset stops at the
// first open transaction of the partition, whoever's).
func (k *Kafka) scanMarker(ctx context.Context, ref MarkerRef, task int32, checkpointID int64) (out Outcome, decided bool, err error) {
	pid := int64(-1) // the marker's producer, from the log
	for offset := ref.Offset; ; {
		rp, err := k.fetchUncommitted(ctx, ref, offset)
		if err != nil {
			return 0, false, err
		}
		switch perr := kerr.ErrorForCode(rp.ErrorCode); {
		case errors.Is(perr, kerr.OffsetOutOfRange) && offset == ref.Offset:
			return 0, false, permanent("progress marker at %s is no longer in the log (log start %d): the outcome of checkpoint %d cannot be read: %w",
				ref, rp.LogStartOffset, checkpointID, perr)
		case perr != nil:
			return 0, false, fmt.Errorf("fetch %s/%d@%d: %w", ref.Topic, ref.Partition, offset, perr)
		}
		fp, next := kgo.ProcessFetchPartition(kgo.ProcessFetchPartitionOpts{
			KeepControlRecords: true,
			Offset:             offset,
			IsolationLevel:     kgo.ReadUncommitted(),
			Topic:              ref.Topic,
			Partition:          ref.Partition,
		}, rp, kgo.DefaultDecompressor(), nil)
		if fp.Err != nil && len(fp.Records) == 0 {
			return 0, false, fmt.Errorf("fetch %s/%d@%d: %w", ref.Topic, ref.Partition, offset, fp.Err)
		}
		for _, r := range fp.Records {
			if pid < 0 {
				if err := checkMarker(ref, r, task, checkpointID); err != nil {
					return 0, false, err
				}
				pid = r.ProducerID
				continue
			}
			if !r.Attrs.IsControl() || r.ProducerID != pid {
				continue
			}
			var key kmsg.ControlRecordKey
			if err := key.ReadFrom(r.Key); err != nil {
				return 0, false, permanent("control record at %s/%d@%d: %w", ref.Topic, ref.Partition, r.Offset, err)
			}
			switch key.Type {
			case kmsg.ControlRecordKeyTypeCommit:
				return Committed, true, nil
			case kmsg.ControlRecordKeyTypeAbort:
				return Lost, true, nil
			}
		}
		if next <= offset || next >= rp.HighWatermark {
			if pid < 0 {
				return 0, false, fmt.Errorf("no record at %s yet (high watermark %d)", ref, rp.HighWatermark)
			}
			return 0, false, nil
		}
		offset = next
	}
}

// checkMarker checks that r, the first record read at ref, is the marker of
// task's checkpoint.
func checkMarker(ref MarkerRef, r *kgo.Record, task int32, checkpointID int64) error {
	if r.Offset != ref.Offset || r.Attrs.IsControl() {
		return permanent("no progress marker at %s (first record at offset %d): compacted or truncated?", ref, r.Offset)
	}
	var m progressMarker
	if err := json.Unmarshal(r.Value, &m); err != nil {
		return permanent("record at %s is not a progress marker: %w", ref, err)
	}
	if m.Task != task || m.Checkpoint != checkpointID {
		return permanent("record at %s is the marker of task %d checkpoint %d, not of task %d checkpoint %d (progress topic recreated?)",
			ref, m.Task, m.Checkpoint, task, checkpointID)
	}
	return nil
}

// fetchUncommitted sends one read_uncommitted fetch of ref's partition at
// offset to its leader and returns the partition's answer at once.
func (k *Kafka) fetchUncommitted(ctx context.Context, ref MarkerRef, offset int64) (*kmsg.FetchResponseTopicPartition, error) {
	md, err := k.adm.Metadata(ctx, ref.Topic)
	if err != nil {
		return nil, err
	}
	td, ok := md.Topics[ref.Topic]
	if !ok || td.Err != nil {
		return nil, fmt.Errorf("metadata of %s: %v", ref.Topic, td.Err)
	}
	pd, ok := td.Partitions[ref.Partition]
	if !ok || pd.Err != nil || pd.Leader < 0 {
		return nil, fmt.Errorf("metadata of %s/%d: no leader (%v)", ref.Topic, ref.Partition, pd.Err)
	}
	req := kmsg.NewPtrFetchRequest()
	req.MaxWaitMillis = 0
	req.MinBytes = 0
	req.MaxBytes = 1 << 20
	req.IsolationLevel = 0 // read_uncommitted: control records decide
	rt := kmsg.NewFetchRequestTopic()
	rt.Topic = ref.Topic
	rt.TopicID = td.ID
	rpq := kmsg.NewFetchRequestTopicPartition()
	rpq.Partition = ref.Partition
	rpq.FetchOffset = offset
	rpq.PartitionMaxBytes = 1 << 20
	rt.Partitions = append(rt.Partitions, rpq)
	req.Topics = append(req.Topics, rt)
	kresp, err := k.plain.Broker(int(pd.Leader)).Request(ctx, req)
	if err != nil {
		return nil, err
	}
	resp := kresp.(*kmsg.FetchResponse)
	if err := kerr.ErrorForCode(resp.ErrorCode); err != nil {
		return nil, err
	}
	for i := range resp.Topics {
		for j := range resp.Topics[i].Partitions {
			if rp := &resp.Topics[i].Partitions[j]; rp.Partition == ref.Partition {
				return rp, nil
			}
		}
	}
	return nil, errors.New("fetch answered without the partition")
}

// String formats ref as topic/partition@offset.
func (ref MarkerRef) String() string {
	return fmt.Sprintf("%s/%d@%d", ref.Topic, ref.Partition, ref.Offset)
}

func errString(err error) string {
	if err == nil {
		return "NONE"
	}
	return err.Error()
}
