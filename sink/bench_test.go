package sink

import (
	"context"
	"net"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
)

func newBenchSink(b *testing.B, hooks ...kgo.Hook) (*kfake.Cluster, *Kafka) {
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(outPartitions, outTopic))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(c.Close)
	opts := []kgo.Opt{kgo.DisableClientMetrics()}
	if len(hooks) > 0 {
		opts = append(opts, kgo.WithHooks(hooks...))
	}
	k, err := NewKafka(context.Background(), KafkaConfig{Brokers: c.ListenAddrs(), Job: testJob, Logger: testLogger(), ClientOpts: opts})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(k.Close)
	return c, k
}

// BenchmarkPreCommit measures the synchronous part of a barrier (PreCommit
// alone); the flush and commit run outside the timer.
func BenchmarkPreCommit(b *testing.B) {
	_, k := newBenchSink(b)
	ctx := context.Background()
	w, err := k.NewWriter(ctx, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer w.Close()
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		w.Write(&kgo.Record{Topic: outTopic, Key: []byte("k"), Value: []byte("v")})
		b.StartTimer()
		pc, err := w.PreCommit(ctx, int64(i+1))
		b.StopTimer()
		if err != nil {
			b.Fatal(err)
		}
		cm, err := pc.Wait(ctx)
		if err != nil {
			b.Fatal(err)
		}
		if err := w.Commit(ctx, []Committable{*cm}); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}

type connCounter struct{ n atomic.Int64 }

func (c *connCounter) OnBrokerConnect(_ kgo.BrokerMetadata, _ time.Duration, _ net.Conn, err error) {
	if err == nil {
		c.n.Add(1)
	}
}

// BenchmarkWriterFootprint reports the heap, goroutines and connections one
// exactly-once writer (pool of 3) costs once it has written and committed.
func BenchmarkWriterFootprint(b *testing.B) {
	const tasks = 20
	for range b.N {
		b.StopTimer()
		var conns connCounter
		_, k := newBenchSink(b, &conns)
		ctx := context.Background()
		runtime.GC()
		var before runtime.MemStats
		runtime.ReadMemStats(&before)
		g0, c0 := runtime.NumGoroutine(), conns.n.Load()
		b.StartTimer()
		var ws []Writer
		for task := range int32(tasks) {
			w, err := k.NewWriter(ctx, task)
			if err != nil {
				b.Fatal(err)
			}
			ws = append(ws, w)
			for id := int64(1); id <= 3; id++ { // every slot used once
				w.Write(&kgo.Record{Topic: outTopic, Key: []byte("k"), Value: []byte("v")})
				pc, err := w.PreCommit(ctx, id)
				if err != nil {
					b.Fatal(err)
				}
				cm, err := pc.Wait(ctx)
				if err != nil {
					b.Fatal(err)
				}
				if err := w.Commit(ctx, []Committable{*cm}); err != nil {
					b.Fatal(err)
				}
			}
		}
		b.StopTimer()
		runtime.GC()
		var after runtime.MemStats
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/tasks/1024, "heapKiB/writer")
		b.ReportMetric(float64(runtime.NumGoroutine()-g0)/tasks, "goroutines/writer")
		b.ReportMetric(float64(conns.n.Load()-c0)/tasks, "conns/writer")
		for _, w := range ws {
			w.Close()
		}
	}
}
