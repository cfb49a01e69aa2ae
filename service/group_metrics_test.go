package service_test

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/sluice-stream/sluice/coordinator"
)

// grpGet GETs path from the admin server and returns status and body.
func grpGet(t *testing.T, addr, path string) (int, []byte) {
	t.Helper()
	cl := &http.Client{Timeout: 10 * time.Second}
	resp, err := cl.Get("http://" + addr + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: read body: %v", path, err)
	}
	return resp.StatusCode, body
}

// grpScrape GETs /metrics and parses it with Prometheus' own text parser.
func grpScrape(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	status, body := grpGet(t, addr, "/metrics")
	if status != http.StatusOK {
		t.Fatalf("GET /metrics: status %d: %s", status, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("parse /metrics: %v\n%s", err, body)
	}
	return fams
}

// grpPerTask returns a family's value per task label (counter or gauge).
func grpPerTask(t *testing.T, fams map[string]*dto.MetricFamily, name string, typ dto.MetricType) map[int32]float64 {
	t.Helper()
	f := fams[name]
	if f == nil {
		t.Fatalf("metric %s missing", name)
	}
	if f.GetType() != typ {
		t.Fatalf("metric %s is a %s, want a %s", name, f.GetType(), typ)
	}
	out := map[int32]float64{}
	for _, m := range f.GetMetric() {
		var task string
		for _, l := range m.GetLabel() {
			if l.GetName() == "task" {
				task = l.GetValue()
			}
		}
		n, err := strconv.Atoi(task)
		if err != nil {
			t.Fatalf("metric %s has a series without a numeric task label: %v", name, m.GetLabel())
		}
		switch typ {
		case dto.MetricType_COUNTER:
			out[int32(n)] = m.GetCounter().GetValue()
		case dto.MetricType_GAUGE:
			out[int32(n)] = m.GetGauge().GetValue()
		}
	}
	if len(out) != grpTasks {
		t.Fatalf("metric %s has series for tasks %v, want all %d", name, grpSortedKeys(out), grpTasks)
	}
	return out
}

// grpHistogram returns a histogram family's count and sum.
func grpHistogram(t *testing.T, fams map[string]*dto.MetricFamily, name string) (uint64, float64) {
	t.Helper()
	f := fams[name]
	if f == nil {
		t.Fatalf("metric %s missing", name)
	}
	if f.GetType() != dto.MetricType_HISTOGRAM || len(f.GetMetric()) != 1 {
		t.Fatalf("metric %s: want one histogram, got %d series of %s", name, len(f.GetMetric()), f.GetType())
	}
	h := f.GetMetric()[0].GetHistogram()
	if len(h.GetBucket()) == 0 {
		t.Fatalf("histogram %s has no buckets", name)
	}
	return h.GetSampleCount(), h.GetSampleSum()
}

// TestGroupAdminEndpoints runs one instance with its admin server on
// 127.0.0.1:0 and checks every endpoint: /healthz answers 200; /readyz 503
// while a task is being restored (its takeover is held in a hook) and 200
// once every task runs; /metrics, parsed with Prometheus' text parser, has
// every named series with values that match the input (records in and out
// per task equal to what was produced, lag 0 once caught up, checkpoint
// histograms observed, no failed checkpoint, the newest checkpoint id per
// task, the tasks owned); /checkpoints is JSON with every task's
// checkpoint history.
func TestGroupAdminEndpoints(t *testing.T) {
	e := newGrpEnv(t)
	c := e.config("M", "classic")
	c.AdminAddr = "127.0.0.1:0"
	hold := make(chan struct{})
	var holdOnce sync.Once
	releaseHold := func() { holdOnce.Do(func() { close(hold) }) }
	defer releaseHold() // before the instance is stopped (cleanups run after defers)
	var heldTasks sync.Map
	c.Hook = func(task int32, s coordinator.Step, _ int64) error {
		if s == coordinator.StepClaimed {
			heldTasks.Store(task, true)
			<-hold
		}
		return nil
	}
	// The broker holds the instance's SyncGroup (the answer carrying its
	// first assignment) until /readyz was asked: an instance that has not
	// yet joined is not ready, however few tasks it runs (none yet).
	syncHeld, syncRelease := make(chan struct{}), make(chan struct{})
	var syncOnce, syncReleaseOnce sync.Once
	releaseSync := func() { syncReleaseOnce.Do(func() { close(syncRelease) }) }
	defer releaseSync()
	e.cluster.ControlKey(int16(kmsg.SyncGroup), func(kmsg.Request) (kmsg.Response, error, bool) {
		syncOnce.Do(func() {
			close(syncHeld)
			e.cluster.SleepControl(func() { <-syncRelease })
		})
		return nil, nil, false
	})
	m := e.start(c)
	addr := m.p.AdminAddr()
	if addr == "" {
		t.Fatal("no admin address")
	}

	if status, body := grpGet(t, addr, "/healthz"); status != http.StatusOK {
		t.Fatalf("/healthz: %d %s", status, body)
	}
	select {
	case <-syncHeld:
	case <-time.After(30 * time.Second):
		t.Fatal("the instance did not join the group")
	}
	for range 5 {
		if status, body := grpGet(t, addr, "/readyz"); status != http.StatusServiceUnavailable {
			t.Fatalf("/readyz before the group's first assignment: %d %s, want 503", status, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
	releaseSync()
	grpWait(t, 30*time.Second, "a task assigned and held in its takeover", func() bool {
		n := 0
		heldTasks.Range(func(any, any) bool { n++; return true })
		return n > 0
	})
	if status, body := grpGet(t, addr, "/readyz"); status != http.StatusServiceUnavailable {
		t.Fatalf("/readyz while a task is restored: %d %s, want 503", status, body)
	}
	releaseHold()
	grpWait(t, 30*time.Second, "/readyz 200 once every task is restored", func() bool {
		status, _ := grpGet(t, addr, "/readyz")
		return status == http.StatusOK && len(m.tasks()) == grpTasks
	})

	pr := e.produce(20, 20*time.Millisecond)
	e.waitProgress(m, 1000)
	if err := pr.stop(); err != nil {
		t.Fatal(err)
	}
	total := float64(e.stream.Total())
	e.waitOutput(60 * time.Second)

	// Counters settle once the output is committed; lag is updated per
	// fetched batch, so it reaches 0 with the last one.
	var fams map[string]*dto.MetricFamily
	grpWait(t, 30*time.Second, "records_in to match the input and the lag to reach 0", func() bool {
		fams = grpScrape(t, addr)
		var in, lag float64
		for _, v := range grpPerTask(t, fams, "sluice_records_in_total", dto.MetricType_COUNTER) {
			in += v
		}
		for _, v := range grpPerTask(t, fams, "sluice_consumer_lag_records", dto.MetricType_GAUGE) {
			lag += v
		}
		return in == total && lag == 0
	})
	var out float64
	for task, v := range grpPerTask(t, fams, "sluice_records_out_total", dto.MetricType_COUNTER) {
		if v <= 0 {
			t.Errorf("task %d: records_out %v", task, v)
		}
		out += v
	}
	if out != total {
		t.Errorf("sluice_records_out_total sums to %v, want one output per input: %v", out, total)
	}
	for task, v := range grpPerTask(t, fams, "sluice_records_in_total", dto.MetricType_COUNTER) {
		if v != float64(e.stream.Total()/grpTasks) {
			t.Errorf("task %d: records_in %v, want %d", task, v, e.stream.Total()/grpTasks)
		}
	}
	stats := m.p.Instance.Stats()
	for task, v := range grpPerTask(t, fams, "sluice_last_completed_checkpoint_id", dto.MetricType_GAUGE) {
		if v < 2 { // 1 is the claim
			t.Errorf("task %d: last completed checkpoint id %v", task, v)
		}
		if now := float64(stats[task].LastCheckpointID.Load()); v > now {
			t.Errorf("task %d: metric says checkpoint %v, the task only %v", task, v, now)
		}
	}
	for task, v := range grpPerTask(t, fams, "sluice_checkpoints_completed_total", dto.MetricType_COUNTER) {
		if v < 1 {
			t.Errorf("task %d: %v checkpoints completed", task, v)
		}
	}
	for task, v := range grpPerTask(t, fams, "sluice_checkpoints_failed_total", dto.MetricType_COUNTER) {
		if v != 0 {
			t.Errorf("task %d: %v checkpoints failed", task, v)
		}
	}
	if f := fams["sluice_tasks_owned"]; f == nil || f.GetType() != dto.MetricType_GAUGE || len(f.GetMetric()) != 1 {
		t.Errorf("sluice_tasks_owned: %v", f)
	} else if v := f.GetMetric()[0].GetGauge().GetValue(); v != grpTasks {
		t.Errorf("sluice_tasks_owned %v, want %d", v, grpTasks)
	}
	durN, durSum := grpHistogram(t, fams, "sluice_checkpoint_duration_seconds")
	if durN == 0 || durSum <= 0 {
		t.Errorf("checkpoint duration: %d observations, sum %v", durN, durSum)
	}
	if n, sum := grpHistogram(t, fams, "sluice_checkpoint_size_bytes"); n == 0 || sum <= 0 {
		t.Errorf("checkpoint size: %d observations, sum %v", n, sum)
	}
	// Every finished checkpoint observes its sync pause (the registry
	// gathers the histograms one after the other while checkpoints go on,
	// so the counts are not compared); the pause is short.
	if n, sum := grpHistogram(t, fams, "sluice_checkpoint_sync_pause_seconds"); n == 0 || sum <= 0 || sum/float64(n) > 0.1 {
		t.Errorf("sync pause: %d observations, sum %vs", n, sum)
	}
	if n, sum := grpHistogram(t, fams, "sluice_transaction_commit_latency_seconds"); n == 0 || sum <= 0 {
		t.Errorf("commit latency: %d observations, sum %v", n, sum)
	}

	// /checkpoints: JSON, every task's history, completed checkpoints in
	// increasing id order with offsets.
	status, body := grpGet(t, addr, "/checkpoints")
	if status != http.StatusOK {
		t.Fatalf("/checkpoints: %d %s", status, body)
	}
	var hist map[string][]coordinator.CheckpointRecord
	if err := json.Unmarshal(body, &hist); err != nil {
		t.Fatalf("/checkpoints is not JSON of checkpoint records: %v\n%s", err, body)
	}
	for task := range int32(grpTasks) {
		rs := hist[strconv.Itoa(int(task))]
		if len(rs) == 0 {
			t.Errorf("/checkpoints: no history of task %d", task)
			continue
		}
		completed := 0
		for i, r := range rs {
			if r.Task != task || (i > 0 && r.ID <= rs[i-1].ID) {
				t.Errorf("/checkpoints task %d: record %d is %+v (after id %d)", task, i, r, rs[max(i-1, 0)].ID)
			}
			if r.Status == "completed" {
				completed++
				if _, ok := r.Offsets[grpInput]; !ok || r.Duration <= 0 {
					t.Errorf("/checkpoints task %d: completed checkpoint %d without offsets or duration: %+v", task, r.ID, r)
				}
			}
		}
		if completed == 0 {
			t.Errorf("/checkpoints task %d: no completed checkpoint in %d records", task, len(rs))
		}
	}
	t.Logf("%d checkpoints took %.1f ms on average; history of task 0: %d records", durN, 1000*durSum/float64(durN), len(hist["0"]))
	if err := m.stop(); err != nil {
		t.Fatal(err)
	}
	e.checkExactlyOnce()
}
