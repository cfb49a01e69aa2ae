package service

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sluice-stream/sluice/coordinator"
)

// metrics are the instance's Prometheus series. Counters and gauges are read
// from the tasks' atomic counters at scrape time (nothing on the record
// path); distributions are observed once per checkpoint.
type metrics struct {
	reg       *prometheus.Registry
	instance  *coordinator.Instance
	duration  prometheus.Histogram
	syncPause prometheus.Histogram
	size      prometheus.Histogram
	uploaded  prometheus.Histogram
	commit    prometheus.Histogram

	recordsIn, recordsOut, completed, failed, lastID, lag, owned *prometheus.Desc
}

func newMetrics() *metrics {
	buckets := prometheus.ExponentialBuckets(0.0005, 2, 18) // 0.5 ms … ~65 s
	bytes := prometheus.ExponentialBuckets(1024, 4, 12)     // 1 KiB … 4 GiB
	m := &metrics{
		reg: prometheus.NewRegistry(),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sluice_checkpoint_duration_seconds",
			Help: "Time from a checkpoint's barrier to its completion.", Buckets: buckets}),
		syncPause: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sluice_checkpoint_sync_pause_seconds",
			Help: "How long a barrier held up record processing.", Buckets: buckets}),
		size: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sluice_checkpoint_size_bytes",
			Help: "Full size of a completed checkpoint's state.", Buckets: bytes}),
		uploaded: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sluice_checkpoint_uploaded_bytes",
			Help: "Bytes a completed checkpoint uploaded (incremental size).", Buckets: bytes}),
		commit: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sluice_transaction_commit_latency_seconds",
			Help: "Time to commit a completed checkpoint's transactions.", Buckets: buckets}),
		recordsIn:  prometheus.NewDesc("sluice_records_in_total", "Input records processed.", []string{"task"}, nil),
		recordsOut: prometheus.NewDesc("sluice_records_out_total", "Output records written.", []string{"task"}, nil),
		completed:  prometheus.NewDesc("sluice_checkpoints_completed_total", "Completed checkpoints.", []string{"task"}, nil),
		failed:     prometheus.NewDesc("sluice_checkpoints_failed_total", "Failed checkpoints.", []string{"task"}, nil),
		lastID:     prometheus.NewDesc("sluice_last_completed_checkpoint_id", "Id of the newest completed checkpoint.", []string{"task"}, nil),
		lag:        prometheus.NewDesc("sluice_consumer_lag_records", "Input records behind the end of the log.", []string{"task"}, nil),
		owned:      prometheus.NewDesc("sluice_tasks_owned", "Tasks this instance runs.", nil, nil),
	}
	m.reg.MustRegister(m.duration, m.syncPause, m.size, m.uploaded, m.commit, m,
		prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	return m
}

// observe records a finished checkpoint.
func (m *metrics) observe(r coordinator.CheckpointRecord) {
	m.syncPause.Observe(r.SyncPause.Seconds())
	if r.Status != "completed" {
		return
	}
	m.duration.Observe(r.Duration.Seconds())
	m.size.Observe(float64(r.FullBytes))
	m.uploaded.Observe(float64(r.UploadedBytes))
	m.commit.Observe(r.CommitLatency.Seconds())
}

// Describe implements prometheus.Collector.
func (m *metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{m.recordsIn, m.recordsOut, m.completed, m.failed, m.lastID, m.lag, m.owned} {
		ch <- d
	}
}

// Collect implements prometheus.Collector from the tasks' counters.
func (m *metrics) Collect(ch chan<- prometheus.Metric) {
	if m.instance == nil {
		return
	}
	for task, s := range m.instance.Stats() {
		l := strconv.Itoa(int(task))
		ch <- prometheus.MustNewConstMetric(m.recordsIn, prometheus.CounterValue, float64(s.RecordsIn.Load()), l)
		ch <- prometheus.MustNewConstMetric(m.recordsOut, prometheus.CounterValue, float64(s.RecordsOut.Load()), l)
		ch <- prometheus.MustNewConstMetric(m.completed, prometheus.CounterValue, float64(s.CheckpointsCompleted.Load()), l)
		ch <- prometheus.MustNewConstMetric(m.failed, prometheus.CounterValue, float64(s.CheckpointsFailed.Load()), l)
		ch <- prometheus.MustNewConstMetric(m.lastID, prometheus.GaugeValue, float64(s.LastCheckpointID.Load()), l)
		ch <- prometheus.MustNewConstMetric(m.lag, prometheus.GaugeValue, float64(s.Lag.Load()), l)
	}
	ch <- prometheus.MustNewConstMetric(m.owned, prometheus.GaugeValue, float64(len(m.instance.Tasks())))
}

// admin serves /healthz, /readyz, /metrics and /checkpoints.
type admin struct {
	srv *http.Server
	ln  net.Listener
}

// startAdmin listens on addr ("" disables the server).
func startAdmin(addr string, in *coordinator.Instance, m *metrics, log *slog.Logger) (*admin, error) {
	if addr == "" {
		return nil, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("admin port %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !in.Ready() {
			http.Error(w, "tasks are being restored", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /checkpoints", func(w http.ResponseWriter, _ *http.Request) {
		out := map[string][]coordinator.CheckpointRecord{}
		for task, s := range in.Stats() {
			out[strconv.Itoa(int(task))] = s.History()
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(out)
	})
	a := &admin{srv: &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}, ln: ln}
	go func() {
		if err := a.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("admin server stopped", "err", err)
		}
	}()
	log.Info("admin endpoints listening", "addr", ln.Addr().String())
	return a, nil
}

// Addr is the address the admin server listens on.
func (a *admin) Addr() string { return a.ln.Addr().String() }

func (a *admin) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = a.srv.Shutdown(ctx)
}
