package sluicetest

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/moby/moby/api/types/container"
	mobynet "github.com/moby/moby/api/types/network"
	"github.com/testcontainers/testcontainers-go"
	"github.com/testcontainers/testcontainers-go/wait"
	"github.com/twmb/franz-go/pkg/kgo"

	// cmd/broker, which BuildImage compiles inside the user's module, needs
	// kfake; importing it here keeps kfake in the go.sum of every module
	// that uses sluicetest.
	_ "github.com/twmb/franz-go/pkg/kfake"
)

// Broker is the env's Kafka broker: the kfake broker (cmd/broker) or a
// real Kafka image, with its data on a Docker volume and its address fixed
// for its lifetime, so it can be killed and restarted like a real broker.
type Broker struct {
	// Addr is the broker's address (gateway:port), for the host and the
	// containers alike: what Kafka metadata advertises.
	Addr string
	// Image is the image it runs.
	Image string
	// Real is true for a real Kafka image, false for kfake.
	Real bool

	box *box
}

// brokerPort is the broker's port inside its container.
const brokerPort = "9092/tcp"

// startBroker starts the broker container on a published port of the
// gateway and waits until it answers Kafka requests from the host.
func (e *Env) startBroker(ctx context.Context, t testing.TB) *Broker {
	t.Helper()
	port, err := e.hostPort()
	if err != nil {
		t.Fatalf("sluicetest: %v", err)
	}
	addr := net.JoinHostPort(e.Gateway.String(), strconv.Itoa(port))
	vol := e.volume("kafka-data")
	b := &Broker{Addr: addr, Real: e.opts.KafkaImage != ""}
	var req testcontainers.ContainerRequest
	if b.Real {
		b.Image = e.opts.KafkaImage
		req = kafkaRequest(b.Image, addr, e.opts)
	} else {
		b.Image = string(BuildImage(t, BrokerPackage))
		req = testcontainers.ContainerRequest{
			Image: b.Image,
			Cmd: append([]string{
				"--listen", "0.0.0.0:9092",
				"--advertise", addr,
				"--data-dir", "/data",
				"--partitions", strconv.Itoa(e.opts.Partitions),
				// Short group sessions for tests (kfake's default
				// minimum is 6 s).
				"--broker-config", "group.min.session.timeout.ms=500",
			}, e.opts.BrokerArgs...),
			Mounts:     testcontainers.Mounts(testcontainers.VolumeMount(vol, "/data")),
			WaitingFor: wait.ForLog("listening on").WithStartupTimeout(time.Minute),
		}
	}
	req.ExposedPorts = []string{brokerPort}
	gw := e.Gateway
	req.HostConfigModifier = func(hc *container.HostConfig) {
		hc.PortBindings = mobynet.PortMap{
			mobynet.MustParsePort(brokerPort): {{HostIP: gw, HostPort: strconv.Itoa(port)}},
		}
	}
	if b.Real {
		req.Mounts = testcontainers.Mounts(testcontainers.VolumeMount(vol, "/var/lib/kafka/data"))
	}
	bx, err := e.run(ctx, t, "kafka", req)
	if err != nil {
		t.Fatalf("sluicetest: broker: %v", err)
	}
	b.box = bx
	if err := b.waitReady(ctx); err != nil {
		b.box.dumpLogs(t, 100)
		t.Fatalf("sluicetest: %v", err)
	}
	return b
}

// kafkaRequest is a single-node KRaft Apache Kafka (the apache/kafka
// image's environment variables) advertising addr, with test timings:
// replication factor 1 everywhere, no initial rebalance delay, short group
// sessions allowed.
func kafkaRequest(image, addr string, opts Options) testcontainers.ContainerRequest {
	env := map[string]string{
		"CLUSTER_ID":                                     "c2x1aWNldGVzdC1rcmFmdA",
		"KAFKA_NODE_ID":                                  "1",
		"KAFKA_PROCESS_ROLES":                            "broker,controller",
		"KAFKA_LISTENERS":                                "PLAINTEXT://0.0.0.0:9092,CONTROLLER://localhost:9093",
		"KAFKA_ADVERTISED_LISTENERS":                     "PLAINTEXT://" + addr,
		"KAFKA_LISTENER_SECURITY_PROTOCOL_MAP":           "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
		"KAFKA_CONTROLLER_LISTENER_NAMES":                "CONTROLLER",
		"KAFKA_INTER_BROKER_LISTENER_NAME":               "PLAINTEXT",
		"KAFKA_CONTROLLER_QUORUM_VOTERS":                 "1@localhost:9093",
		"KAFKA_LOG_DIRS":                                 "/var/lib/kafka/data",
		"KAFKA_NUM_PARTITIONS":                           strconv.Itoa(opts.Partitions),
		"KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR":         "1",
		"KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS":             "1",
		"KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
		"KAFKA_TRANSACTION_STATE_LOG_MIN_ISR":            "1",
		"KAFKA_TRANSACTION_STATE_LOG_NUM_PARTITIONS":     "1",
		"KAFKA_DEFAULT_REPLICATION_FACTOR":               "1",
		"KAFKA_MIN_INSYNC_REPLICAS":                      "1",
		"KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS":         "0",
		"KAFKA_GROUP_MIN_SESSION_TIMEOUT_MS":             "500",
		"KAFKA_AUTO_CREATE_TOPICS_ENABLE":                "false",
	}
	for _, kv := range opts.BrokerArgs {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
	}
	return testcontainers.ContainerRequest{
		Image:      image,
		Env:        env,
		WaitingFor: wait.ForLog("Kafka Server started").WithStartupTimeout(3 * time.Minute),
	}
}

// waitReady waits until the broker answers a metadata request from the
// host (after a restart too: kfake first repairs what a crash left).
func (b *Broker) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	var last error
	for {
		cl, err := kgo.NewClient(kgo.SeedBrokers(b.Addr), kgo.DialTimeout(2*time.Second), kgo.RequestRetries(0))
		if err == nil {
			pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
			err = cl.Ping(pctx)
			pcancel()
			cl.Close()
			if err == nil {
				return nil
			}
		}
		last = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("broker %s not answering: %v", b.Addr, last)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Kill crashes the broker (SIGKILL): nothing is saved beyond what was
// written. kfake aborts every transaction that was open when it starts
// again; a real Kafka keeps them open until their timeout.
func (b *Broker) Kill(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := b.box.kill(ctx); err != nil {
		t.Fatalf("sluicetest: kill broker: %v", err)
	}
}

// Stop stops the broker gracefully (SIGTERM) and waits until it exited.
func (b *Broker) Stop(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := b.box.stop(ctx, time.Minute); err != nil {
		t.Fatalf("sluicetest: stop broker: %v", err)
	}
}

// Start starts a killed or stopped broker again on its data volume and
// address, and waits until it answers.
func (b *Broker) Start(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if err := b.box.start(ctx); err != nil {
		t.Fatalf("sluicetest: %v", err)
	}
	if err := b.waitReady(ctx); err != nil {
		b.box.dumpLogs(t, 100)
		t.Fatalf("sluicetest: restarted broker: %v", err)
	}
}

// Logs returns what the broker container logged, over all its runs.
func (b *Broker) Logs(t testing.TB) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := b.box.logs(ctx)
	if err != nil {
		t.Fatalf("sluicetest: %v", err)
	}
	return s
}
