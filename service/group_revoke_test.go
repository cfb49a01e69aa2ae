package service_test

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/sluice-stream/sluice/coordinator"
	"github.com/sluice-stream/sluice/internal/kafkatest"
	"github.com/sluice-stream/sluice/source"
)

// TestGroupRevokeDuringTakeoverKeepsSourceFlowing is the regression test of
// a stall found by TestGroupKilledInstance: a task revoked (or lost) while
// its takeover seeks its input gives up on Source.Assign with its context's
// error. If the source's dispatcher was busy at that moment (blocked
// handing a batch to another task's full inbox), the assignment stayed
// queued and ran later anyway: it registered an inbox no task reads or
// releases, the dispatcher blocked on it for good, and every task of the
// instance stopped receiving input.
//
// Staged on one Source: task 0's inbox is left unread until it is full (the
// dispatcher no longer waits for it, it pauses the task's partition, but an
// assignment may still be queued when its caller gives up); an Assign of
// task 1 then gives up (its context is done) after it was queued for the
// dispatcher. Then task 0 is read again: all of its input must arrive (the
// abandoned assignment must not have taken effect).
func TestGroupRevokeDuringTakeoverKeepsSourceFlowing(t *testing.T) {
	const topic = "grp-src"
	addr, _ := kafkatest.Start(t)
	kafkatest.CreateTopics(t, addr, 2, topic)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	src, err := source.New(ctx, source.Config{Brokers: []string{addr}, Group: "grp-src", Topics: []string{topic}})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	runCtx, stopRun := context.WithCancel(ctx)
	runDone := make(chan error, 1)
	go func() { runDone <- src.Run(runCtx) }()
	defer func() { stopRun(); <-runDone }()

	prod := kafkatest.Client(t, addr, kgo.RecordPartitioner(kgo.ManualPartitioner()), kgo.DefaultProduceTopic(topic))
	produced := map[int32]int{}
	produce := func(p int32, n int) {
		t.Helper()
		var recs []*kgo.Record
		for range n {
			recs = append(recs, &kgo.Record{Partition: p, Value: []byte(strconv.Itoa(produced[p]))})
			produced[p]++
		}
		if err := prod.ProduceSync(ctx, recs...).FirstErr(); err != nil {
			t.Fatal(err)
		}
	}

	in0, err := src.Assign(ctx, 0, map[string]int64{topic: 0})
	if err != nil {
		t.Fatal(err)
	}
	// Fill task 0's inbox; each produce is fetched as at least one batch.
	grpWait(t, 30*time.Second, "task 0's inbox full", func() bool {
		if len(in0.C) == cap(in0.C) {
			return true
		}
		produce(0, 1)
		time.Sleep(5 * time.Millisecond)
		return false
	})
	// An assignment whose context is done gives up, as a revoked task's
	// takeover does, whether or not it was queued for the dispatcher
	// already (which of the two is up to chance: many attempts make sure
	// some were queued); one that took effect is released.
	gaveUp := 0
	for range 30 {
		produce(0, 1)
		actx, acancel := context.WithCancel(ctx)
		acancel()
		in1, err := src.Assign(actx, 1, map[string]int64{topic: 0})
		if err != nil {
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("assign task 1: %v", err)
			}
			gaveUp++
			continue
		}
		if err := src.Release(ctx, in1); err != nil {
			t.Fatal(err)
		}
	}
	if gaveUp == 0 {
		t.Fatal("could not stage an abandoned assignment")
	}
	t.Logf("%d of 30 assignments of task 1 given up", gaveUp)

	// Task 0 is read again. Round by round, task 1 and task 0 get a record
	// each, and every record of task 0 must arrive: each round takes the
	// dispatcher through a fetch, so an inbox registered for task 1 would
	// get a batch per round and, unread, fill up and stop the dispatcher.
	next := 0
	read := func() {
		t.Helper()
		for next < produced[0] {
			select {
			case b := <-in0.C:
				if b.Err != nil {
					t.Fatal(b.Err)
				}
				for _, r := range b.Records {
					if r.Partition != 0 || r.Offset != int64(next) {
						t.Fatalf("task 0 got %s/%d@%d, want offset %d of partition 0", r.Topic, r.Partition, r.Offset, next)
					}
					next++
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("task 0 received %d of its %d records, then nothing for 10s: the source's dispatcher is stuck (on an inbox of the abandoned assignment of task 1?)", next, produced[0])
			}
		}
	}
	read()
	for range 3 * cap(in0.C) {
		produce(1, 1)
		produce(0, 1)
		read()
	}
}

// TestGroupRevokeDuringBarrierTakesFinalCheckpoint is the regression test of
// a replay found by TestGroupScaleOutAndIn: a task revoked while its record
// loop was inside a barrier (pre-committing the sink's transaction, which
// waits for the previous transaction's acknowledgment) had that barrier
// interrupted by the revocation's cancellation, stopped with the error
// instead of taking its final checkpoint, and the next owner replayed
// everything since the previous checkpoint.
//
// Staged deterministically: one instance (GroupProtocol none, so the test
// drives Instance.Revoke and Assign itself, as the group's callbacks do)
// holds task 0 inside a barrier (hook at StepBarrier) until Revoke has
// cancelled the task, then lets the barrier go on. The task must stop after
// its final checkpoint, and when it is assigned again nothing may be
// processed twice: the sum of RecordsIn equals the input.
func TestGroupRevokeDuringBarrierTakesFinalCheckpoint(t *testing.T) {
	e := newGrpEnv(t)
	c := e.config("R", "none")
	inBarrier, release := make(chan struct{}), make(chan struct{})
	var armed atomic.Bool
	c.Hook = func(task int32, s coordinator.Step, _ int64) error {
		if task == 0 && s == coordinator.StepBarrier && armed.CompareAndSwap(true, false) {
			close(inBarrier)
			<-release
		}
		return nil
	}
	r := e.start(c)
	e.waitBalanced(r)
	pr := e.produce(5, 20*time.Millisecond)
	e.waitProgress(r, 200)

	mark := e.log.mark()
	armed.Store(true)
	select {
	case <-inBarrier:
	case <-time.After(30 * time.Second):
		t.Fatal("task 0 took no barrier")
	}
	revoked := make(chan struct{})
	go func() {
		defer close(revoked)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		r.p.Instance.Revoke(ctx, []int32{0})
	}()
	// Revoke cancels the task (and forgets it) before it waits for it.
	grpWait(t, 30*time.Second, "task 0 cancelled by the revocation", func() bool {
		return !slices.Contains(r.tasks(), 0)
	})
	close(release)
	select {
	case <-revoked:
	case <-time.After(30 * time.Second):
		t.Fatal("Revoke did not return")
	}
	log := e.log.since(mark)
	if !strings.Contains(log, "task stopped after final checkpoint") || strings.Contains(log, "task stopped with an error") {
		t.Fatalf("task 0 did not stop after its final checkpoint when revoked during a barrier:\n%s", grpLines(log, "task=0"))
	}

	r.p.Instance.Assign([]int32{0})
	e.waitBalanced(r)
	e.waitProgress(r, 100)
	if err := pr.stop(); err != nil {
		t.Fatal(err)
	}
	e.waitOutput(60 * time.Second)
	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
	e.checkExactlyOnce()
	if got, total := grpRecordsIn(r), int64(e.stream.Total()); got != total {
		t.Fatalf("%d input records processed for %d produced: %d processed twice after the revocation", got, total, got-total)
	}
}

// grpLines returns the lines of log that contain s.
func grpLines(log, s string) string {
	var out []string
	for _, line := range strings.Split(log, "\n") {
		if strings.Contains(line, s) {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}
