package sluicetest

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/testcontainers/testcontainers-go"
)

// Processor is one processor container: an instance of a Sluice job.
type Processor struct {
	// Name is the instance's name: its --instance-id and its network
	// alias.
	Name string
	// Args is its whole command line.
	Args []string

	box *box
}

// adminPort is where processors serve /healthz, /readyz, /metrics.
const adminPort = "8080/tcp"

// ProcessorArgs returns the flags the env gives a processor named name:
// --brokers, --checkpoint-dir (and the S3 flags with Options.S3),
// --instance-id, --admin-addr :8080, --log-format json. StartProcessor
// appends them to the caller's arguments, so do not pass them yourself.
func (e *Env) ProcessorArgs(name string) []string {
	args := []string{
		"--brokers", e.Broker.Addr,
		"--checkpoint-dir", e.CheckpointDir,
		"--instance-id", name,
		"--admin-addr", ":8080",
		"--log-format", "json",
	}
	if e.S3 != nil {
		args = append(args, e.S3.processorArgs()...)
	}
	return args
}

// StartProcessor starts a processor container of img called name, with
// the command line args (e.g. "run", "--job", "counts", "--interval",
// "200ms") followed by ProcessorArgs(name), and waits until it serves
// /healthz. Every processor of the env shares the checkpoint location. The
// container is removed when the test ends; with a failed test its log's
// tail is printed.
func (e *Env) StartProcessor(t testing.TB, img Image, name string, args ...string) *Processor {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := append(append([]string(nil), args...), e.ProcessorArgs(name)...)
	env := map[string]string{}
	if e.S3 != nil {
		env = e.S3.processorEnv()
	}
	req := testcontainers.ContainerRequest{
		Image:        string(img),
		Cmd:          cmd,
		Env:          env,
		ExposedPorts: []string{adminPort},
	}
	if e.S3 == nil {
		req.Mounts = testcontainers.Mounts(testcontainers.VolumeMount(e.volume("checkpoints"), ckptVolumePath))
	}
	bx, err := e.run(ctx, t, name, req)
	if err != nil {
		t.Fatalf("sluicetest: processor %s: %v", name, err)
	}
	p := &Processor{Name: name, Args: cmd, box: bx}
	e.mu.Lock()
	e.processors = append(e.processors, p)
	e.mu.Unlock()
	if err := p.waitHealthy(ctx); err != nil {
		bx.dumpLogs(t, 100)
		t.Fatalf("sluicetest: %v", err)
	}
	return p
}

// StartProcessors starts n processors of img (see StartProcessor), named
// proc-1, proc-2, ... in the order of all the env's processors.
func (e *Env) StartProcessors(t testing.TB, img Image, n int, args ...string) []*Processor {
	t.Helper()
	var ps []*Processor
	for range n {
		e.mu.Lock()
		name := "proc-" + strconv.Itoa(len(e.processors)+1)
		e.mu.Unlock()
		ps = append(ps, e.StartProcessor(t, img, name, args...))
	}
	return ps
}

// Processors returns every processor the env started, in order.
func (e *Env) Processors() []*Processor {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]*Processor(nil), e.processors...)
}

// waitHealthy waits until the processor serves /healthz; it fails at once
// if the process exits.
func (p *Processor) waitHealthy(ctx context.Context) error {
	for {
		if code, err := p.get(ctx, "/healthz"); err == nil && code == http.StatusOK {
			return nil
		}
		if run, err := p.box.running(ctx); err == nil && !run {
			return fmt.Errorf("processor %s exited while starting", p.Name)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("processor %s: /healthz not answering: %w", p.Name, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// get fetches path from the admin endpoint and returns the status code.
func (p *Processor) get(ctx context.Context, path string) (int, error) {
	code, _, err := p.fetch(ctx, path)
	return code, err
}

// fetch GETs path from the admin endpoint.
func (p *Processor) fetch(ctx context.Context, path string) (int, []byte, error) {
	addr, err := p.box.hostAddr(ctx, adminPort)
	if err != nil {
		return 0, nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+path, nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, fmt.Errorf("GET %s of %s: %w", path, p.Name, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, nil, fmt.Errorf("GET %s of %s: %w", path, p.Name, err)
	}
	return resp.StatusCode, body, nil
}

// Ready reports whether the processor answers /readyz with 200: it runs
// its share of the tasks, each restored and processing.
func (p *Processor) Ready(ctx context.Context) bool {
	code, err := p.get(ctx, "/readyz")
	return err == nil && code == http.StatusOK
}

// Scrape reads the processor's /metrics.
func (p *Processor) Scrape(ctx context.Context) (Metrics, error) {
	code, body, err := p.fetch(ctx, "/metrics")
	if err != nil {
		return nil, err
	}
	if code != http.StatusOK {
		return nil, fmt.Errorf("GET /metrics of %s: status %d", p.Name, code)
	}
	m, err := ParseMetrics(body)
	if err != nil {
		return nil, fmt.Errorf("metrics of %s: %w", p.Name, err)
	}
	return m, nil
}

// Metrics reads the processor's /metrics; it fails the test if it cannot.
func (p *Processor) Metrics(t testing.TB) Metrics {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	m, err := p.Scrape(ctx)
	if err != nil {
		t.Fatalf("sluicetest: %v", err)
	}
	return m
}

// Kill crashes the processor (SIGKILL) and waits until it is gone. Start
// brings it back.
func (p *Processor) Kill(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := p.box.kill(ctx); err != nil {
		t.Fatalf("sluicetest: %v", err)
	}
}

// Stop stops the processor gracefully (SIGTERM: final checkpoints, then it
// leaves the group) and returns its exit status; past timeout it is killed
// and the test fails.
func (p *Processor) Stop(t testing.TB, timeout time.Duration) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout+time.Minute)
	defer cancel()
	code, err := p.box.stop(ctx, timeout)
	if err != nil {
		t.Fatalf("sluicetest: %v", err)
	}
	return code
}

// Start starts a killed or stopped processor again, with the same command
// line, container file system (its work folder) and instance name, and
// waits until it serves /healthz.
func (p *Processor) Start(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := p.box.start(ctx); err != nil {
		t.Fatalf("sluicetest: %v", err)
	}
	if err := p.waitHealthy(ctx); err != nil {
		p.box.dumpLogs(t, 100)
		t.Fatalf("sluicetest: %v", err)
	}
}

// Running reports whether the processor's process runs.
func (p *Processor) Running(t testing.TB) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	run, err := p.box.running(ctx)
	if err != nil {
		t.Fatalf("sluicetest: %v", err)
	}
	return run
}

// Disconnect cuts the processor off the network (docker network
// disconnect): it reaches neither the broker nor the S3 store, and the host
// cannot reach its admin endpoint, until Reconnect. A shared checkpoint
// volume stays reachable.
func (p *Processor) Disconnect(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := p.box.disconnect(ctx); err != nil {
		t.Fatalf("sluicetest: %v", err)
	}
}

// Reconnect attaches a disconnected processor to the network again.
func (p *Processor) Reconnect(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := p.box.reconnect(ctx); err != nil {
		t.Fatalf("sluicetest: %v", err)
	}
}

// Pause freezes the processor (docker pause), like a long GC pause or a
// stopped VM; Unpause thaws it.
func (p *Processor) Pause(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := p.box.pause(ctx); err != nil {
		t.Fatalf("sluicetest: %v", err)
	}
}

// Unpause thaws a paused processor.
func (p *Processor) Unpause(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := p.box.unpause(ctx); err != nil {
		t.Fatalf("sluicetest: %v", err)
	}
}

// Logs returns everything the processor logged (stdout and stderr), over
// all its runs.
func (p *Processor) Logs(t testing.TB) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := p.box.logs(ctx)
	if err != nil {
		t.Fatalf("sluicetest: %v", err)
	}
	return s
}
