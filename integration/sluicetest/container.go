package sluicetest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/moby/moby/api/types/container"
	mobynet "github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"
	"github.com/testcontainers/testcontainers-go"
)

// EnvLogs names the environment variable that, set to anything, prints
// every container's whole log when its test ends (by default only the tail
// of each log of a failed test is printed).
const EnvLogs = "SLUICETEST_LOGS"

// box is one container of the env with the operations the scenarios need:
// signals, restarts, pause, network cuts, logs.
type box struct {
	env *Env
	// name is the container's short name in the env (also its network
	// alias).
	name string
	ctr  testcontainers.Container
}

// run creates and starts a container for req on the env's network, named
// and aliased name, removed when the test ends.
func (e *Env) run(ctx context.Context, t testing.TB, name string, req testcontainers.ContainerRequest) (*box, error) {
	e.mu.Lock()
	if e.names[name] {
		e.mu.Unlock()
		return nil, fmt.Errorf("a container named %q already runs in this env", name)
	}
	e.names[name] = true
	e.mu.Unlock()
	req.Name = e.containerName(name)
	req.Networks = []string{e.Network}
	req.NetworkAliases = map[string][]string{e.Network: {name}}
	if req.Labels == nil {
		req.Labels = map[string]string{}
	}
	req.Labels["sluicetest"] = e.id
	// Publish every exposed port on the gateway address only (a free port
	// unless the request fixed one): the host reaches it there, the
	// outside world does not.
	userHC, gw := req.HostConfigModifier, e.Gateway
	req.HostConfigModifier = func(hc *container.HostConfig) {
		if userHC != nil {
			userHC(hc)
		}
		if hc.PortBindings == nil {
			hc.PortBindings = mobynet.PortMap{}
		}
		for _, p := range req.ExposedPorts {
			port, err := mobynet.ParsePort(p)
			if err != nil {
				continue // testcontainers reports it
			}
			if len(hc.PortBindings[port]) == 0 {
				hc.PortBindings[port] = []mobynet.PortBinding{{HostIP: gw, HostPort: "0"}}
			}
		}
	}
	ctr, err := testcontainers.GenericContainer(ctx, testcontainers.GenericContainerRequest{
		ContainerRequest: req, Started: true, Logger: logger(t),
	})
	b := &box{env: e, name: name, ctr: ctr}
	// A failed start may still have created the container (or return a
	// nil pointer in the interface).
	if dc, _ := ctr.(*testcontainers.DockerContainer); dc != nil {
		t.Cleanup(func() {
			switch {
			case os.Getenv(EnvLogs) != "":
				b.dumpLogs(t, math.MaxInt)
			case t.Failed():
				b.dumpLogs(t, 200)
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			// Removed at once (SIGKILL): the test is over.
			if err := testcontainers.TerminateContainer(ctr, testcontainers.StopContext(ctx), testcontainers.StopTimeout(0)); err != nil && !isNotFound(err) {
				t.Errorf("sluicetest: remove container %s: %v", name, err)
			}
		})
	}
	if err != nil {
		return nil, fmt.Errorf("start container %s: %w", name, err)
	}
	return b, nil
}

// id is the Docker container id.
func (b *box) id() string { return b.ctr.GetContainerID() }

// signal sends sig to the container's main process.
func (b *box) signal(ctx context.Context, sig string) error {
	if _, err := b.env.docker.ContainerKill(ctx, b.id(), client.ContainerKillOptions{Signal: sig}); err != nil {
		return fmt.Errorf("%s to %s: %w", sig, b.name, err)
	}
	return nil
}

// wait waits until the container exited and returns its exit status.
func (b *box) wait(ctx context.Context) (int, error) {
	res := b.env.docker.ContainerWait(ctx, b.id(), client.ContainerWaitOptions{Condition: container.WaitConditionNotRunning})
	select {
	case r := <-res.Result:
		if r.Error != nil && r.Error.Message != "" {
			return int(r.StatusCode), fmt.Errorf("wait for %s: %s", b.name, r.Error.Message)
		}
		return int(r.StatusCode), nil
	case err := <-res.Error:
		return -1, fmt.Errorf("wait for %s to exit: %w", b.name, err)
	}
}

// kill crashes the container's process (SIGKILL) and waits until it is gone.
func (b *box) kill(ctx context.Context) error {
	if err := b.signal(ctx, "SIGKILL"); err != nil {
		return err
	}
	_, err := b.wait(ctx)
	return err
}

// stop sends SIGTERM and waits up to timeout for the process to exit; it
// returns the exit status. Past the timeout the container is killed and
// stop returns an error.
func (b *box) stop(ctx context.Context, timeout time.Duration) (int, error) {
	if err := b.signal(ctx, "SIGTERM"); err != nil {
		return -1, err
	}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	code, err := b.wait(wctx)
	if err != nil && wctx.Err() != nil && ctx.Err() == nil {
		_ = b.kill(ctx)
		return -1, fmt.Errorf("%s did not exit within %s of SIGTERM; killed", b.name, timeout)
	}
	return code, err
}

// start starts the stopped container again: same file system, volumes,
// network and published ports.
func (b *box) start(ctx context.Context) error {
	if _, err := b.env.docker.ContainerStart(ctx, b.id(), client.ContainerStartOptions{}); err != nil {
		return fmt.Errorf("start %s again: %w", b.name, err)
	}
	return nil
}

// running reports whether the container's process runs (paused counts as
// running).
func (b *box) running(ctx context.Context) (bool, error) {
	st, err := b.ctr.State(ctx)
	if err != nil {
		return false, fmt.Errorf("state of %s: %w", b.name, err)
	}
	return st.Running, nil
}

// pause freezes every process of the container (cgroup freezer): its
// sockets stay open but nothing answers.
func (b *box) pause(ctx context.Context) error {
	if _, err := b.env.docker.ContainerPause(ctx, b.id(), client.ContainerPauseOptions{}); err != nil {
		return fmt.Errorf("pause %s: %w", b.name, err)
	}
	return nil
}

// unpause thaws a paused container.
func (b *box) unpause(ctx context.Context) error {
	if _, err := b.env.docker.ContainerUnpause(ctx, b.id(), client.ContainerUnpauseOptions{}); err != nil {
		return fmt.Errorf("unpause %s: %w", b.name, err)
	}
	return nil
}

// disconnect cuts the container off the env's network: it reaches nothing
// and nothing reaches it (it has no other network).
func (b *box) disconnect(ctx context.Context) error {
	if _, err := b.env.docker.NetworkDisconnect(ctx, b.env.nw.ID, client.NetworkDisconnectOptions{Container: b.id(), Force: true}); err != nil {
		return fmt.Errorf("disconnect %s from network %s: %w", b.name, b.env.Network, err)
	}
	return nil
}

// reconnect attaches the container to the env's network again, under its
// alias.
func (b *box) reconnect(ctx context.Context) error {
	_, err := b.env.docker.NetworkConnect(ctx, b.env.nw.ID, client.NetworkConnectOptions{
		Container:      b.id(),
		EndpointConfig: &mobynet.EndpointSettings{Aliases: []string{b.name}},
	})
	if err != nil {
		return fmt.Errorf("reconnect %s to network %s: %w", b.name, b.env.Network, err)
	}
	return nil
}

// hostAddr returns the address (gateway:port) published for the
// container's TCP port port ("8080/tcp").
func (b *box) hostAddr(ctx context.Context, port string) (string, error) {
	p, err := b.ctr.MappedPort(ctx, port)
	if err != nil {
		return "", fmt.Errorf("published port %s of %s: %w", port, b.name, err)
	}
	return net.JoinHostPort(b.env.Gateway.String(), p.Port()), nil
}

// logs returns everything the container wrote to stdout and stderr, over
// all its runs.
func (b *box) logs(ctx context.Context) (string, error) {
	rc, err := b.ctr.Logs(ctx)
	if err != nil {
		return "", fmt.Errorf("logs of %s: %w", b.name, err)
	}
	defer rc.Close()
	var sb strings.Builder
	if _, err := io.Copy(&sb, rc); err != nil && !errors.Is(err, io.EOF) {
		return sb.String(), fmt.Errorf("read logs of %s: %w", b.name, err)
	}
	return sb.String(), nil
}

// dumpLogs logs the container's last lines into the test's output.
func (b *box) dumpLogs(t testing.TB, lines int) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := b.logs(ctx)
	if err != nil {
		t.Logf("sluicetest: %v", err)
		return
	}
	t.Logf("sluicetest: log of %s:\n%s", b.name, tail(s, lines))
}
