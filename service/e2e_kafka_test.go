package service_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"sort"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/sluice-stream/sluice/internal/kafkatest"
)

// e2eReadAll reads every data record of topic up to the high watermark
// each partition has now, with the given isolation. With read_committed use
// kafkatest.ReadCommitted instead: it also proves no open transaction pins
// the end.
func e2eReadAll(t *testing.T, addr, topic string, iso kgo.IsolationLevel) []*kgo.Record {
	t.Helper()
	var out []*kgo.Record
	for _, r := range e2eReadRaw(t, addr, topic, iso) {
		if !r.Attrs.IsControl() {
			out = append(out, r)
		}
	}
	return out
}

// e2eReadRaw is e2eReadAll with the control records (commit and abort
// markers) kept; they also let it find the end of a partition that ends
// with one.
func e2eReadRaw(t *testing.T, addr, topic string, iso kgo.IsolationLevel) []*kgo.Record {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ends, err := kadm.NewClient(kafkatest.Client(t, addr)).ListEndOffsets(ctx, topic)
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		t.Fatalf("end offsets of %s: %v", topic, err)
	}
	want := map[int32]int64{}
	ends.Each(func(o kadm.ListedOffset) {
		if o.Offset > 0 {
			want[o.Partition] = o.Offset
		}
	})
	cl := kafkatest.Client(t, addr, kgo.ConsumeTopics(topic), kgo.FetchIsolationLevel(iso),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.KeepControlRecords())
	defer cl.Close()
	var out []*kgo.Record
	for len(want) > 0 {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("reading %s: partitions %v not read to their end", topic, want)
		}
		fs.EachRecord(func(r *kgo.Record) {
			end, ok := want[r.Partition]
			if !ok || r.Offset >= end {
				return
			}
			out = append(out, r)
			if r.Offset == end-1 {
				delete(want, r.Partition)
			}
		})
	}
	return out
}

// e2eMarker is a progress marker as the sink writes it (its JSON).
type e2eMarker struct {
	Task       int32 `json:"task"`
	Checkpoint int64 `json:"checkpoint"`
	Partition  int32 `json:"-"`
	Offset     int64 `json:"-"`
}

type e2ePos struct {
	partition int32
	offset    int64
}

// e2eMarkers reads the job's progress markers: all of them (read
// uncommitted, aborted and committed alike) and the positions of those
// whose transaction committed (visible to read_committed). Call it after
// the job stopped: the committed read writes sentinels into the topic.
func e2eMarkers(t *testing.T, addr string) (all []e2eMarker, committed map[e2ePos]bool) {
	t.Helper()
	parts := e2eTopicPartitions(t, addr, e2eProgress)
	committed = map[e2ePos]bool{}
	for _, r := range kafkatest.ReadCommitted(t, addr, e2eProgress, parts, 30*time.Second) {
		committed[e2ePos{r.Partition, r.Offset}] = true
	}
	for _, r := range e2eReadAll(t, addr, e2eProgress, kgo.ReadUncommitted()) {
		if string(r.Key) == kafkatest.SentinelKey {
			continue
		}
		var m e2eMarker
		if err := json.Unmarshal(r.Value, &m); err != nil {
			t.Fatalf("progress record %d@%d is not a marker: %v", r.Partition, r.Offset, err)
		}
		m.Partition, m.Offset = r.Partition, r.Offset
		all = append(all, m)
	}
	return all, committed
}

func e2eTopicPartitions(t *testing.T, addr, topic string) int32 {
	t.Helper()
	tds, err := kadm.NewClient(kafkatest.Client(t, addr)).ListTopics(context.Background(), topic)
	if err != nil {
		t.Fatal(err)
	}
	td, ok := tds[topic]
	if !ok || td.Err != nil {
		t.Fatalf("topic %s: %v", topic, td.Err)
	}
	return int32(len(td.Partitions))
}

// e2eOngoing lists the transactional ids of the job's prefix whose
// transaction the broker has open.
func e2eOngoing(t *testing.T, addr string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	list, err := kadm.NewClient(kafkatest.Client(t, addr)).ListTransactions(ctx, nil, []string{"Ongoing"})
	if err != nil {
		t.Fatalf("list transactions: %v", err)
	}
	re := regexp.MustCompile(`^sluice-` + e2eJob + `-\d+-\d+$`)
	var ids []string
	for id, lt := range list {
		if lt.State == "Ongoing" && re.MatchString(id) {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	return ids
}

// e2eDumpRaw writes every record of topic, control records included, read
// uncommitted, to path: a debugging aid (SLUICE_E2E_DUMP, see e2e_test.go).
func e2eDumpRaw(t *testing.T, addr, topic string, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, r := range e2eReadRaw(t, addr, topic, kgo.ReadUncommitted()) {
		if r.Attrs.IsControl() {
			var k kmsg.ControlRecordKey
			_ = k.ReadFrom(r.Key)
			fmt.Fprintf(f, "p%d @%d pid=%d ep=%d CONTROL %v\n", r.Partition, r.Offset, r.ProducerID, r.ProducerEpoch, k.Type)
			continue
		}
		fmt.Fprintf(f, "p%d @%d pid=%d ep=%d txn=%v %s=%s\n", r.Partition, r.Offset, r.ProducerID, r.ProducerEpoch, r.Attrs.IsTransactional(), r.Key, r.Value)
	}
}
