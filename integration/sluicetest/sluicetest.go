// Package sluicetest runs end-to-end tests of Sluice jobs on containers
// (testcontainers-go): a Kafka broker, optionally an S3 store for the
// checkpoints, and any number of processor containers of the job's own
// image, all on one Docker network of the test, with the producer and the
// read_committed verifier on the host.
//
//	func TestMyJob(t *testing.T) {
//		env := sluicetest.Start(t, sluicetest.Options{S3: true})
//		img := sluicetest.BuildImage(t, "github.com/acme/clicks/cmd/job")
//		env.CreateTopics(t, 6, "events", "counts")
//		procs := env.StartProcessors(t, img, 3, "run", "--interval", "200ms")
//		env.Produce(t, "events", records) // []*kgo.Record
//		out := env.WaitCommitted(t, "counts", len(records), time.Minute)
//		procs[0].Kill(t) // SIGKILL; procs[0].Start(t) brings it back
//		...
//	}
//
// Images are built by the test itself: BuildImage compiles a main package
// as a static binary and wraps it FROM scratch, so nothing is pulled from a
// registry; images are tagged by the binary's hash and reused across runs.
// The broker is Sluice's cmd/broker (franz-go's kfake with a data folder on
// a Docker volume), or, with Options.KafkaImage or the environment variable
// SLUICE_KAFKA_IMAGE (e.g. apache/kafka:3.9.0), a single-node KRaft Apache
// Kafka. The S3 store is versitygw, from the binary in SLUICE_S3_SERVER or
// the user cache (built there with `go install` on first use).
//
// Addressing: the broker advertises the Docker network's gateway address
// and a published port bound to it, which both the host (the test, kcat)
// and the containers reach; cutting a container off the network
// (Processor.Disconnect) cuts it off the broker too. This needs a Docker
// engine on the test's own Linux host (not Docker Desktop's VM).
//
// Start skips the test under `go test -short` and when no Docker engine
// answers (it fails instead when CI=true). Set TESTCONTAINERS_RYUK_DISABLED=true
// where the Ryuk image cannot be pulled: sluicetest removes its containers,
// network and volumes itself when the test ends, and keeps the images.
package sluicetest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/moby/moby/client"
	"github.com/testcontainers/testcontainers-go"
	tclog "github.com/testcontainers/testcontainers-go/log"
	"github.com/testcontainers/testcontainers-go/network"
)

// EnvKafkaImage names the environment variable that selects a real Kafka
// image (e.g. apache/kafka:3.9.0) instead of the kfake broker.
const EnvKafkaImage = "SLUICE_KAFKA_IMAGE"

// BrokerPackage is the main package of the kfake broker image.
const BrokerPackage = "github.com/sluice-stream/sluice/cmd/broker"

// Options configures an Env.
type Options struct {
	// S3 also starts an S3 store (versitygw) with a bucket, and makes
	// processors keep their checkpoints there (s3://<bucket>/checkpoints).
	// Without it, processors share a Docker volume as checkpoint folder.
	S3 bool
	// KafkaImage runs this Apache Kafka image (KRaft, one node) instead of
	// the kfake broker; empty means $SLUICE_KAFKA_IMAGE, and if that is
	// empty too, the kfake broker built from BrokerPackage.
	KafkaImage string
	// Partitions is the partition count of topics the broker creates on
	// its own (default 6).
	Partitions int
	// BrokerArgs are extra flags of the kfake broker (cmd/broker), such
	// as "--broker-config", "transaction.max.timeout.ms=60000", or extra
	// environment variables KEY=VALUE of a real Kafka image.
	BrokerArgs []string
	// S3Server is the path of the versitygw binary; empty means
	// $SLUICE_S3_SERVER, then the user cache (see S3ServerBinary).
	S3Server string
}

// Env is one test's Docker network with a broker, an optional S3 store and
// the processors started in it. Its methods fail the test on errors.
type Env struct {
	// Network is the name of the Docker network.
	Network string
	// Gateway is the network's gateway address: the host, as the
	// containers see it.
	Gateway netip.Addr
	// Broker is the Kafka broker.
	Broker *Broker
	// S3 is the S3 store, nil without Options.S3.
	S3 *S3
	// CheckpointDir is the --checkpoint-dir every processor gets.
	CheckpointDir string

	t      testing.TB
	id     string
	opts   Options
	docker *testcontainers.DockerClient
	nw     *testcontainers.DockerNetwork

	mu         sync.Mutex
	volumes    []string
	processors []*Processor
	names      map[string]bool
}

// ckptVolumePath is where the shared checkpoint volume is mounted.
const ckptVolumePath = "/checkpoints"

// Start starts a network with a broker (and an S3 store with Options.S3)
// for the test; everything is removed when the test ends. It skips the test
// under -short or without a Docker engine (see the package doc).
func Start(t testing.TB, opts Options) *Env {
	t.Helper()
	RequireDocker(t)
	if opts.KafkaImage == "" {
		opts.KafkaImage = os.Getenv(EnvKafkaImage)
	}
	if opts.Partitions <= 0 {
		opts.Partitions = 6
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cli, err := dockerClient(ctx)
	if err != nil {
		t.Fatalf("sluicetest: %v", err)
	}
	e := &Env{t: t, id: randomID(), opts: opts, docker: cli, names: map[string]bool{}}
	// Registered first, so it runs last: after every container is gone.
	t.Cleanup(e.cleanup)

	nw, err := network.New(ctx, network.WithLabels(map[string]string{"sluicetest": e.id}))
	if err != nil {
		hint := ""
		if strings.Contains(err.Error(), "reaper") {
			hint = " (where the Ryuk reaper image cannot be pulled, set TESTCONTAINERS_RYUK_DISABLED=true: sluicetest cleans up itself)"
		}
		t.Fatalf("sluicetest: create network: %v%s", err, hint)
	}
	e.nw, e.Network = nw, nw.Name
	if e.Gateway, err = e.gateway(ctx); err != nil {
		t.Fatalf("sluicetest: %v", err)
	}

	e.Broker = e.startBroker(ctx, t)
	if opts.S3 {
		e.S3 = e.startS3(ctx, t)
		e.CheckpointDir = "s3://" + e.S3.Bucket + "/checkpoints"
	} else {
		e.CheckpointDir = ckptVolumePath
	}
	return e
}

// RequireDocker skips the test under -short, and when no Docker engine
// answers; in CI (CI=true) a missing engine fails the test instead.
func RequireDocker(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("sluicetest: container test skipped under -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cli, err := dockerClient(ctx)
	if err == nil {
		_, err = cli.Ping(ctx, client.PingOptions{})
		cli.Close()
	}
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("sluicetest: Docker is needed in CI: %v", err)
		}
		t.Skipf("sluicetest: no Docker engine answers: %v", err)
	}
}

// dockerClient returns a client of the Docker engine testcontainers uses.
func dockerClient(ctx context.Context) (*testcontainers.DockerClient, error) {
	cli, err := testcontainers.NewDockerClientWithOpts(ctx)
	if err != nil {
		return nil, fmt.Errorf("docker client: %w", err)
	}
	return cli, nil
}

// gateway returns the IPv4 gateway of the env's network.
func (e *Env) gateway(ctx context.Context) (netip.Addr, error) {
	res, err := e.docker.NetworkInspect(ctx, e.nw.ID, client.NetworkInspectOptions{})
	if err != nil {
		return netip.Addr{}, fmt.Errorf("inspect network %s: %w", e.Network, err)
	}
	for _, c := range res.Network.IPAM.Config {
		if c.Gateway.Is4() {
			return c.Gateway, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("network %s has no IPv4 gateway (IPAM %+v)", e.Network, res.Network.IPAM.Config)
}

// hostPort returns a port of the gateway address that is free now; it is
// published for a container with a fixed port, so the address survives a
// restart of the container.
func (e *Env) hostPort() (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(e.Gateway.String(), "0"))
	if err != nil {
		return 0, fmt.Errorf("find a free port on the gateway %s: %w", e.Gateway, err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// containerName returns the unique Docker name of the env's container
// called name.
func (e *Env) containerName(name string) string {
	return "sluicetest-" + e.id + "-" + name
}

// volume returns the name of the env's volume called name; it is removed
// when the test ends.
func (e *Env) volume(name string) string {
	v := "sluicetest-" + e.id + "-" + name
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, have := range e.volumes {
		if have == v {
			return v
		}
	}
	e.volumes = append(e.volumes, v)
	return v
}

// logger returns testcontainers' logger for the test: its messages show
// with -v or when the test fails.
func logger(t testing.TB) tclog.Logger { return tclog.TestLogger(t) }

// cleanup removes the network and volumes (the containers are removed by
// their own cleanups, which run before this one) and dumps what the
// containers logged when the test failed.
func (e *Env) cleanup() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var errs []error
	if e.nw != nil {
		if err := e.nw.Remove(ctx); err != nil {
			errs = append(errs, fmt.Errorf("remove network %s: %w", e.Network, err))
		}
	}
	e.mu.Lock()
	vols := append([]string(nil), e.volumes...)
	e.mu.Unlock()
	for _, v := range vols {
		if _, err := e.docker.VolumeRemove(ctx, v, client.VolumeRemoveOptions{Force: true}); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("remove volume %s: %w", v, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		e.t.Errorf("sluicetest: cleanup: %v", err)
	}
	_ = e.docker.Close()
}

// isNotFound reports whether err is Docker's "no such object".
func isNotFound(err error) bool {
	return err != nil && (strings.Contains(err.Error(), "No such") || strings.Contains(err.Error(), "not found"))
}

// randomID returns 8 random hex digits that keep names of concurrent
// envs apart.
func randomID() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{"... (" + strconv.Itoa(len(lines)-n) + " lines before)"}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}
