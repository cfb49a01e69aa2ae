package source_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/sluice-stream/sluice/internal/kafkatest"
	"github.com/sluice-stream/sluice/source"
)

// readOffsets reads n records from in, which must come in offset order from
// from on, without gap or duplicate, within d.
func readOffsets(t *testing.T, in *source.Inbox, from int64, n int, d time.Duration) {
	t.Helper()
	next, end := from, from+int64(n)
	timeout := time.After(d)
	for next < end {
		select {
		case b := <-in.C:
			if b.Err != nil {
				t.Fatal(b.Err)
			}
			for _, r := range b.Records {
				if r.Offset != next {
					t.Fatalf("partition %d: offset %d follows %d", r.Partition, r.Offset, next-1)
				}
				next++
			}
		case <-timeout:
			t.Fatalf("after %s, read up to offset %d of %d..%d", d, next, from, end)
		}
	}
}

// TestStalledTaskDoesNotHoldUpOthers stalls one task (it reads nothing):
// the dispatcher pauses its partition instead of waiting for it, so another
// task of the instance gets all its input; the stalled task then catches
// up without gap or duplicate, and one released while stalled can be
// assigned again.
func TestStalledTaskDoesNotHoldUpOthers(t *testing.T) {
	addr, _ := kafkatest.Start(t)
	kafkatest.CreateTopics(t, addr, 2, "in")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// Many small record batches per partition; with a fetch capped at one
	// batch per partition, the stalled task's inbox fills up at once.
	const batches, perBatch = 100, 5
	const total = batches * perBatch
	cl := kafkatest.Client(t, addr, kgo.RecordPartitioner(kgo.ManualPartitioner()))
	for i := range batches {
		var recs []*kgo.Record
		for p := range int32(2) {
			for j := range perBatch {
				recs = append(recs, &kgo.Record{Topic: "in", Partition: p, Value: []byte(strconv.Itoa(i*perBatch + j))})
			}
		}
		if err := cl.ProduceSync(ctx, recs...).FirstErr(); err != nil {
			t.Fatal(err)
		}
	}

	src, err := source.New(ctx, source.Config{
		Brokers: []string{addr}, Topics: []string{"in"},
		ClientOpts: []kgo.Opt{kgo.FetchMaxPartitionBytes(1), kgo.FetchMaxWait(20 * time.Millisecond)},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- src.Run(runCtx) }()
	defer func() {
		stop()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	from0 := map[string]int64{"in": 0}

	stalled, err := src.Assign(ctx, 0, from0)
	if err != nil {
		t.Fatal(err)
	}
	other, err := src.Assign(ctx, 1, from0)
	if err != nil {
		t.Fatal(err)
	}
	// Task 0 reads nothing: task 1 still gets everything.
	readOffsets(t, other, 0, total, 20*time.Second)
	if n := len(stalled.C); n != cap(stalled.C) {
		t.Fatalf("the stalled task's inbox holds %d batches, want it full (%d): the test proves nothing", n, cap(stalled.C))
	}
	// Once it reads, it catches up: the paused partition was resumed and
	// nothing fetched before the pause was lost or repeated.
	readOffsets(t, stalled, 0, total, 20*time.Second)
	if err := src.Release(ctx, stalled); err != nil {
		t.Fatal(err)
	}

	// Released while stalled (partition paused, batches waiting), then
	// assigned again at another offset: the pause does not outlive it.
	stalled, err = src.Assign(ctx, 0, from0)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for len(stalled.C) < cap(stalled.C) {
		if time.Now().After(deadline) {
			t.Fatal("the inbox never filled up")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := src.Release(ctx, stalled); err != nil {
		t.Fatal(err)
	}
	again, err := src.Assign(ctx, 0, map[string]int64{"in": total / 2})
	if err != nil {
		t.Fatal(err)
	}
	readOffsets(t, again, total/2, total/2, 20*time.Second)
	if err := src.Release(ctx, again); err != nil {
		t.Fatal(err)
	}
}
