package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"slices"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// Crash-abort repair.
//
// When kfake loads a data folder after a crash (SIGKILL), it aborts every
// transaction that was open, but only in its memory: it adds the aborted
// range to the partition's aborted-transaction index and bumps the
// producer's epoch, and writes no ABORT control record to the log. A real
// Kafka broker ends an aborted transaction with an ABORT control record in
// every partition it touched, and clients depend on it:
//
//   - a read_committed consumer (kgo, librdkafka, Java) that gets an aborted
//     transaction (producer id, first offset) in a fetch answer drops that
//     producer's transactional batches from the first offset until it reads
//     the ABORT control record. Without the record it also drops the
//     batches of the producer's later, committed transactions (kfake reuses
//     the producer id for the transactional id, with a new epoch): committed
//     data becomes invisible;
//   - Sluice's sink decides a transaction by the control record that ends it
//     after its progress marker; without one the transaction stays
//     undecided forever.
//
// So on every start, before it accepts connections, the broker looks for
// aborted transactions that no ABORT control record ends and writes the
// missing records (WriteTxnMarkers, which kfake implements), which makes the
// log what a real broker that aborted those transactions would hold.

// repairCrashAborts writes the missing ABORT control records in every
// partition and returns how many it wrote. logf reports each one and every
// partition it could not check.
func repairCrashAborts(ctx context.Context, cl *kgo.Client, logf func(string, ...any)) (int, error) {
	adm := kadm.NewClient(cl)
	tds, err := adm.ListTopicsWithInternal(ctx)
	if err != nil {
		return 0, fmt.Errorf("list topics: %w", err)
	}
	if err := tds.Error(); err != nil {
		return 0, fmt.Errorf("list topics: %w", err)
	}
	if len(tds) == 0 {
		return 0, nil
	}
	starts, err := adm.ListStartOffsets(ctx, tds.Names()...)
	if err != nil {
		return 0, fmt.Errorf("list start offsets: %w", err)
	}
	ends, err := adm.ListEndOffsets(ctx, tds.Names()...)
	if err != nil {
		return 0, fmt.Errorf("list end offsets: %w", err)
	}
	stables, err := adm.ListCommittedOffsets(ctx, tds.Names()...)
	if err != nil {
		return 0, fmt.Errorf("list last stable offsets: %w", err)
	}
	written := 0
	for _, topic := range tds.Names() {
		td := tds[topic]
		for _, p := range td.Partitions.Numbers() {
			start, ok1 := starts.Lookup(topic, p)
			end, ok2 := ends.Lookup(topic, p)
			stable, ok3 := stables.Lookup(topic, p)
			if err := errors.Join(start.Err, end.Err, stable.Err); err != nil || !ok1 || !ok2 || !ok3 {
				logf("%s/%d: offsets unknown (%v); not checked", topic, p, err)
				continue
			}
			if end.Offset <= start.Offset {
				continue // empty
			}
			part := partitionLog{topic: topic, id: td.ID, partition: p, leader: td.Partitions[p].Leader,
				start: start.Offset, stable: stable.Offset, end: end.Offset}
			n, err := part.repair(ctx, cl, logf)
			written += n
			if err != nil {
				return written, fmt.Errorf("%s/%d: %w", topic, p, err)
			}
		}
	}
	return written, nil
}

// partitionLog is one partition to check.
type partitionLog struct {
	topic     string
	id        [16]byte
	partition int32
	leader    int32
	start     int64 // log start offset
	stable    int64 // last stable offset
	end       int64 // high watermark
}

// abortedRange is an aborted transaction of a producer as the broker's
// aborted-transaction index lists it.
type abortedRange struct {
	first int64
	// ended: an ABORT control record of the producer follows first.
	ended bool
	// committedAfter: a COMMIT control record of the producer follows
	// first while no ABORT ended the range: a later transaction of the
	// producer already committed after the crash (this data folder ran
	// without the repair); its records are hidden from read_committed
	// readers and a control record written now would not help them.
	committedAfter bool
}

// repair scans the partition with read_committed fetches (which return the
// aborted-transaction index next to the raw batches) and writes an ABORT
// control record for every aborted range that none ends.
func (pl partitionLog) repair(ctx context.Context, cl *kgo.Client, logf func(string, ...any)) (int, error) {
	aborted := map[int64][]*abortedRange{} // by producer id, by first offset
	epochs := map[int64]int16{}            // newest epoch seen per producer
	for offset := pl.start; offset < pl.stable; {
		rp, err := pl.fetch(ctx, cl, offset)
		if err != nil {
			return 0, err
		}
		for _, a := range rp.AbortedTransactions {
			rs := aborted[a.ProducerID]
			if !slices.ContainsFunc(rs, func(r *abortedRange) bool { return r.first == a.FirstOffset }) {
				rs = append(rs, &abortedRange{first: a.FirstOffset})
				slices.SortFunc(rs, func(a, b *abortedRange) int { return cmp.Compare(a.first, b.first) })
				aborted[a.ProducerID] = rs
			}
		}
		fp, next := kgo.ProcessFetchPartition(kgo.ProcessFetchPartitionOpts{
			KeepControlRecords: true,
			Offset:             offset,
			IsolationLevel:     kgo.ReadUncommitted(), // every batch, aborted or not
			Topic:              pl.topic,
			Partition:          pl.partition,
		}, rp, kgo.DefaultDecompressor(), nil)
		if fp.Err != nil && len(fp.Records) == 0 {
			return 0, fmt.Errorf("read at %d: %w", offset, fp.Err)
		}
		for _, r := range fp.Records {
			if r.ProducerID < 0 {
				continue
			}
			epochs[r.ProducerID] = max(epochs[r.ProducerID], r.ProducerEpoch)
			if !r.Attrs.IsControl() {
				continue
			}
			var key kmsg.ControlRecordKey
			if err := key.ReadFrom(r.Key); err != nil {
				continue
			}
			for _, ar := range aborted[r.ProducerID] {
				if ar.ended || ar.first > r.Offset {
					continue
				}
				if key.Type == kmsg.ControlRecordKeyTypeAbort {
					ar.ended = true
					break // one ABORT ends one transaction
				}
				if key.Type == kmsg.ControlRecordKeyTypeCommit {
					ar.committedAfter = true
				}
			}
		}
		if next <= offset {
			return 0, fmt.Errorf("no progress reading at offset %d (last stable offset %d)", offset, pl.stable)
		}
		offset = next
	}

	written := 0
	for _, pid := range sortedKeys(aborted) {
		for _, ar := range aborted[pid] {
			switch {
			case ar.ended:
				continue
			case pl.stable < pl.end:
				// A transaction is open (the broker was closed cleanly
				// with it): the log above it was not read.
				logf("%s/%d: producer %d's aborted transaction from offset %d has no ABORT record below the last stable offset %d (high watermark %d); not repaired",
					pl.topic, pl.partition, pid, ar.first, pl.stable, pl.end)
				continue
			case ar.committedAfter:
				logf("%s/%d: producer %d's aborted transaction from offset %d has no ABORT record, and a later transaction of the producer committed after it: its records stay hidden from read_committed readers; not repaired",
					pl.topic, pl.partition, pid, ar.first)
				continue
			}
			epoch := epochs[pid]
			if epoch < math.MaxInt16 {
				epoch++ // kfake bumped the epoch when it aborted the transaction
			}
			if err := pl.writeAbort(ctx, cl, pid, epoch); err != nil {
				return written, err
			}
			written++
			logf("%s/%d: wrote the ABORT record of producer %d's transaction from offset %d, aborted when the data was loaded after a crash",
				pl.topic, pl.partition, pid, ar.first)
		}
	}
	return written, nil
}

// fetch sends one read_committed fetch at offset to the partition's leader.
func (pl partitionLog) fetch(ctx context.Context, cl *kgo.Client, offset int64) (*kmsg.FetchResponseTopicPartition, error) {
	req := kmsg.NewPtrFetchRequest()
	req.MaxWaitMillis = 0
	req.MinBytes = 0
	req.MaxBytes = 32 << 20
	req.IsolationLevel = 1 // read_committed: the answer lists aborted transactions
	rt := kmsg.NewFetchRequestTopic()
	rt.Topic = pl.topic
	rt.TopicID = pl.id
	rpq := kmsg.NewFetchRequestTopicPartition()
	rpq.Partition = pl.partition
	rpq.FetchOffset = offset
	rpq.PartitionMaxBytes = 32 << 20
	rt.Partitions = append(rt.Partitions, rpq)
	req.Topics = append(req.Topics, rt)
	kresp, err := cl.Broker(int(pl.leader)).Request(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("fetch at %d: %w", offset, err)
	}
	resp := kresp.(*kmsg.FetchResponse)
	if err := kerr.ErrorForCode(resp.ErrorCode); err != nil {
		return nil, fmt.Errorf("fetch at %d: %w", offset, err)
	}
	for i := range resp.Topics {
		for j := range resp.Topics[i].Partitions {
			if rp := &resp.Topics[i].Partitions[j]; rp.Partition == pl.partition {
				if err := kerr.ErrorForCode(rp.ErrorCode); err != nil {
					return nil, fmt.Errorf("fetch at %d: %w", offset, err)
				}
				return rp, nil
			}
		}
	}
	return nil, errors.New("fetch answered without the partition")
}

// writeAbort appends an ABORT control record of producer pid.
func (pl partitionLog) writeAbort(ctx context.Context, cl *kgo.Client, pid int64, epoch int16) error {
	req := kmsg.NewPtrWriteTxnMarkersRequest()
	m := kmsg.NewWriteTxnMarkersRequestMarker()
	m.ProducerID = pid
	m.ProducerEpoch = epoch
	m.Committed = false
	mt := kmsg.NewWriteTxnMarkersRequestMarkerTopic()
	mt.Topic = pl.topic
	mt.Partitions = []int32{pl.partition}
	m.Topics = append(m.Topics, mt)
	req.Markers = append(req.Markers, m)
	kresp, err := cl.Broker(int(pl.leader)).Request(ctx, req)
	if err != nil {
		return fmt.Errorf("write abort marker of producer %d: %w", pid, err)
	}
	for _, rm := range kresp.(*kmsg.WriteTxnMarkersResponse).Markers {
		for _, rt := range rm.Topics {
			for _, rp := range rt.Partitions {
				if err := kerr.ErrorForCode(rp.ErrorCode); err != nil {
					return fmt.Errorf("write abort marker of producer %d: %w", pid, err)
				}
			}
		}
	}
	return nil
}

func sortedKeys[V any](m map[int64]V) []int64 {
	keys := make([]int64, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
