package kafkatest

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// BuildBroker builds cmd/broker (kfake as a process) into a folder of the
// test and returns the binary's path.
func BuildBroker(t testing.TB) string {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin := filepath.Join(t.TempDir(), "broker")
	cmd := exec.Command(goBin, "build", "-o", bin, "github.com/sluice-stream/sluice/cmd/broker")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build cmd/broker: %v\n%s", err, out)
	}
	return bin
}

// BrokerProcess is a cmd/broker child process with a data folder. It keeps
// its port across restarts, so clients (and the job) reconnect to the same
// address, as they would to a restarted Kafka broker. The process is stopped
// with the test.
type BrokerProcess struct {
	bin  string
	args []string
	// Addr is the broker's address; it does not change on Restart.
	Addr string
	// DataDir is the folder the broker persists to.
	DataDir string

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
	log    LogBuffer
}

// StartBrokerProcess starts bin (see BuildBroker) on a free port of
// 127.0.0.1 with data folder dataDir and the extra flags, and waits until it
// listens.
func StartBrokerProcess(t testing.TB, bin, dataDir string, extra ...string) *BrokerProcess {
	t.Helper()
	b := &BrokerProcess{bin: bin, DataDir: dataDir, args: append([]string{"--data-dir", dataDir}, extra...)}
	t.Cleanup(func() {
		if err := b.Stop(); err != nil {
			t.Error(err)
		}
		if t.Failed() {
			t.Logf("broker process output:\n%s", b.log.String())
		}
	})
	addr, err := b.start("127.0.0.1:0")
	if err != nil {
		t.Fatalf("%v\n%s", err, b.log.String())
	}
	b.Addr = addr
	return b
}

// start runs the binary listening on listen and returns the address it
// advertises once it listens.
func (b *BrokerProcess) start(listen string) (string, error) {
	cmd := exec.Command(b.bin, append([]string{"--listen", listen}, b.args...)...)
	cmd.Stderr = &b.log
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return "", err
	}
	if err := cmd.Start(); err != nil {
		return "", fmt.Errorf("start broker: %w", err)
	}
	exited := make(chan struct{})
	ready := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			line := sc.Text()
			fmt.Fprintf(&b.log, "stdout: %s\n", line)
			// "listening on <bound> advertised <addr>"
			if f := strings.Fields(line); len(f) == 5 && f[0] == "listening" {
				select {
				case ready <- f[4]:
				default:
				}
			}
		}
		_, _ = io.Copy(io.Discard, stdout)
		_ = cmd.Wait()
		close(exited)
	}()
	b.mu.Lock()
	b.cmd, b.exited = cmd, exited
	b.mu.Unlock()
	select {
	case addr := <-ready:
		return addr, nil
	case <-exited:
		return "", fmt.Errorf("broker exited before listening: %v", cmd.ProcessState)
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
		return "", errors.New("broker not listening within 30s")
	}
}

// Kill crashes the broker with SIGKILL and waits until the process is gone.
// Like Stop and Restart it may be called from any goroutine (a protocol
// hook), so it returns errors instead of failing the test.
func (b *BrokerProcess) Kill() error { return b.signal(syscall.SIGKILL) }

// Stop closes the broker cleanly with SIGTERM (it persists its state) and
// waits until it exited. Stopping a stopped broker does nothing.
func (b *BrokerProcess) Stop() error { return b.signal(syscall.SIGTERM) }

func (b *BrokerProcess) signal(sig os.Signal) error {
	b.mu.Lock()
	cmd, exited := b.cmd, b.exited
	b.mu.Unlock()
	if cmd == nil {
		return nil
	}
	select {
	case <-exited:
		return nil
	default:
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-exited:
		return nil
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
		return fmt.Errorf("broker did not exit within 30s of %v", sig)
	}
}

// Restart starts the broker again on the same port and data folder after
// Kill or Stop, and waits until it listens.
func (b *BrokerProcess) Restart() error {
	b.mu.Lock()
	exited := b.exited
	b.mu.Unlock()
	select {
	case <-exited:
	default:
		return errors.New("restart of a running broker")
	}
	_, port, err := net.SplitHostPort(b.Addr)
	if err != nil {
		return err
	}
	fmt.Fprintf(&b.log, "--- restart ---\n")
	got, err := b.start(net.JoinHostPort("127.0.0.1", port))
	if err != nil {
		return err
	}
	if got != b.Addr {
		return fmt.Errorf("restarted broker advertises %s, want %s", got, b.Addr)
	}
	return nil
}

// Output returns what the broker process wrote so far.
func (b *BrokerProcess) Output() string { return b.log.String() }

// LogBuffer is a bytes.Buffer safe for concurrent writers: the sink of a
// test's logs or a child process's output.
type LogBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

// Write appends p.
func (l *LogBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// String returns everything written so far.
func (l *LogBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
