package bench

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sluice-stream/sluice/service"
)

// BenchmarkTaskFootprint runs the passthrough job (exactly-once, default
// pool of MaxPending+1 = 3 transactional ids per task) with 8 and with 64
// tasks, lets every task process some records and complete enough
// checkpoints to have used every id of its pool, and reports what the
// instance holds then: Kafka clients, client TCP connections to the broker,
// goroutines and live heap, with the in-process broker's share (stacks
// through kfake) left out. The per-task figures are totals divided by the
// task count; compare the two task counts for the marginal cost of a task.
func BenchmarkTaskFootprint(b *testing.B) {
	for _, tasks := range []int32{8, 64} {
		b.Run(fmt.Sprintf("tasks=%d", tasks), func(b *testing.B) {
			for range b.N {
				footprint(b, tasks)
			}
		})
	}
}

// flagSettle makes BenchmarkTaskFootprint count the connections again after
// a pause, when idle ones may have been closed.
var flagSettle = flag.Duration("settle", 0, "BenchmarkTaskFootprint: wait this long and count connections again")

func footprint(b *testing.B, tasks int32) {
	b.StopTimer()
	// Every allocation sampled, so the heap split below is exact.
	defer func(rate int) { runtime.MemProfileRate = rate }(runtime.MemProfileRate)
	runtime.MemProfileRate = 1

	cluster, addr := newCluster(b, tasks)
	defer cluster.Close()
	const perTask = 1000
	produceInput(b, addr, perTask*int(tasks))

	heap0 := liveHeap()
	g0 := goroutines()
	conns0 := connections(addr)

	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	b.StartTimer()
	p, err := service.Start(ctx, passthroughJob(), sluiceConfig(b, addr, 100*time.Millisecond), slog.New(slog.DiscardHandler))
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	defer func() {
		stop()
		<-done
	}()
	// All input processed, and every id of a pool of 3 used at least once:
	// three checkpoints completed after the one the task restored.
	deadline := time.Now().Add(2 * time.Minute)
	for {
		stats := p.Instance.Stats() // tasks appear as the group assigns them
		ready := len(stats) == int(tasks)
		var in int64
		for _, s := range stats {
			in += s.RecordsIn.Load()
			if r := s.Restored.Load(); r == 0 || s.LastCheckpointID.Load() < r+3 {
				ready = false
			}
		}
		if ready && in == perTask*int64(tasks) {
			break
		}
		if time.Now().After(deadline) {
			b.Fatal("tasks did not complete three checkpoints within 2 minutes")
		}
		select {
		case err := <-done:
			b.Fatalf("job stopped early: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	b.StopTimer()

	heap1 := liveHeap()
	g1 := goroutines()
	conns1 := connections(addr)
	n := float64(tasks)
	b.ReportMetric(float64(g1.clients-g0.clients), "clients")
	b.ReportMetric(float64(conns1-conns0), "conns")
	b.ReportMetric(float64(conns1-conns0)/n, "conns/task")
	b.ReportMetric(float64(g1.other-g0.other)/n, "goroutines/task")
	h := heap1.minus(heap0)
	b.ReportMetric(float64(h.client())/(1<<20), "heapMiB")
	b.ReportMetric(float64(h.client())/n/1024, "heapKiB/task")
	b.ReportMetric(float64(h.kgo)/n/1024, "kgo-heapKiB/task")
	b.ReportMetric(float64(h.pebble)/n/1024, "pebble-heapKiB/task")
	b.ReportMetric(float64(h.other)/n/1024, "other-heapKiB/task")
	b.ReportMetric(float64(g1.broker-g0.broker)/n, "broker-goroutines/task")
	b.ReportMetric(float64(h.broker)/n/1024, "broker-heapKiB/task")
	if *flagSettle > 0 {
		// kgo closes connections idle for longer than its ConnIdleTimeout.
		time.Sleep(*flagSettle)
		b.ReportMetric(float64(connections(addr)-conns0)/n, "settled-conns/task")
	}

}

// heapSplit is the live heap divided by who allocated it: the in-process
// broker (stacks through kfake), the state backend (Pebble), the Kafka
// clients (kgo) and everything else (Sluice, runtime).
type heapSplit struct{ broker, pebble, kgo, other int64 }

func (h heapSplit) client() int64 { return h.pebble + h.kgo + h.other }

func (h heapSplit) minus(o heapSplit) heapSplit {
	return heapSplit{h.broker - o.broker, h.pebble - o.pebble, h.kgo - o.kgo, h.other - o.other}
}

func isBrokerFrame(fn string) bool { return strings.Contains(fn, "franz-go/pkg/kfake.") }

// liveHeap returns the bytes live after a full GC, split by the allocating
// stack. It is exact only for allocations made while MemProfileRate is 1.
func liveHeap() heapSplit {
	runtime.GC()
	runtime.GC() // the profile describes the heap as of the last completed GC
	var recs []runtime.MemProfileRecord
	n, _ := runtime.MemProfile(nil, true)
	for {
		recs = make([]runtime.MemProfileRecord, n+100)
		var ok bool
		if n, ok = runtime.MemProfile(recs, true); ok {
			recs = recs[:n]
			break
		}
	}
	var s heapSplit
	for i := range recs {
		r := &recs[i]
		var broker, pebble, kgo bool
		frames := runtime.CallersFrames(r.Stack())
		for {
			f, more := frames.Next()
			switch {
			case isBrokerFrame(f.Function):
				broker = true
			case strings.Contains(f.Function, "cockroachdb/pebble"):
				pebble = true
			case strings.Contains(f.Function, "franz-go/pkg/kgo."):
				kgo = true
			}
			if !more {
				break
			}
		}
		switch b := r.InUseBytes(); {
		case broker:
			s.broker += b
		case pebble:
			s.pebble += b
		case kgo:
			s.kgo += b
		default:
			s.other += b
		}
	}
	return s
}

// goroutineCount splits the goroutines between the broker and the rest, and
// counts kgo clients by their metadata loop (one per client).
type goroutineCount struct {
	broker, other, clients int
}

func goroutines() goroutineCount {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var g goroutineCount
	for stack := range bytes.SplitSeq(buf, []byte("\n\n")) {
		s := string(stack)
		switch {
		case strings.Contains(s, "franz-go/pkg/kfake."):
			g.broker++
		default:
			g.other++
		}
		if strings.Contains(s, "kgo.(*Client).updateMetadataLoop") {
			g.clients++
		}
	}
	return g
}

// connections counts established TCP connections whose remote end is the
// broker at addr, that is the client side of every connection to it (the
// broker is in this process, so /proc also lists its own side).
func connections(addr string) int {
	_, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return -1
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return -1
	}
	suffix := fmt.Sprintf(":%04X", port)
	count := 0
	for _, file := range []string{"/proc/self/net/tcp", "/proc/self/net/tcp6"} {
		f, err := os.Open(file)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			// sl local_address rem_address st ...; st 01 is ESTABLISHED.
			if len(fields) > 3 && strings.HasSuffix(fields[2], suffix) && fields[3] == "01" {
				count++
			}
		}
		f.Close()
	}
	return count
}
