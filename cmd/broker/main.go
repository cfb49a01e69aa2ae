// Command broker runs a single-node Kafka broker: the franz-go project's fake
// cluster (github.com/twmb/franz-go/pkg/kfake) wrapped as a process. It
// speaks the Kafka protocol with transactions, consumer groups and optional
// on-disk persistence, which is what Sluice needs for tests that kill the
// broker process and for containers (it builds as a static binary:
// CGO_ENABLED=0 go build ./cmd/broker, so an image can be FROM scratch).
//
// Usage:
//
//	broker [--listen host:port] [--advertise host:port] [--data-dir dir] [--sync]
//	       [--broker-config key=value ...] [--partitions n] [--log-level level]
//	       [--repair-crash-aborts=true|false]
//
// Once it accepts connections it writes one line to stdout:
//
//	listening on <bound host:port> advertised <host:port>
//
// Tests wait for that line; with --listen host:0 it tells the port the
// kernel chose. Diagnostics go to stderr.
//
// SIGTERM or SIGINT closes the broker cleanly, persisting its state to
// --data-dir (open transactions stay open); a second signal forces the exit.
// SIGKILL is the crash case: on the next start from the same --data-dir,
// kfake aborts every transaction that was open (a real Kafka broker would
// keep it open until its transaction timeout). kfake does that without
// writing the ABORT control records a real broker writes, which hides later
// committed records of the same producers from read_committed readers; the
// broker writes the missing records before it lets clients in (see
// repair.go; --repair-crash-aborts=false shows kfake's raw behaviour).
//
// Advertising: kfake tells clients (metadata, FindCoordinator) the address of
// its listener, which is what they connect to after their first request.
// The listener given to kfake reports --advertise as its address: in a
// container, listen on 0.0.0.0:9092 and advertise the name the clients reach
// the container by. Without --advertise, the broker advertises the bound
// address, with an unspecified host (0.0.0.0, ::) replaced by 127.0.0.1.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
)

func main() {
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr, sigs))
}

// config is the command line.
type config struct {
	listen        string
	advertise     string
	dataDir       string
	sync          bool
	brokerConfigs map[string]string
	partitions    int
	logLevel      kfake.LogLevel
	// repairCrashAborts writes the ABORT records kfake omits when it
	// aborts transactions on load after a crash (see repair.go).
	repairCrashAborts bool
}

// parseFlags parses args; errors are reported on stderr by the flag set.
func parseFlags(args []string, stderr io.Writer) (*config, error) {
	c := &config{brokerConfigs: map[string]string{}, logLevel: kfake.LogLevelNone}
	fs := flag.NewFlagSet("broker", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.listen, "listen", "0.0.0.0:9092", "`host:port` to accept Kafka connections on (port 0: any free port)")
	fs.StringVar(&c.advertise, "advertise", "", "`host:port` the broker tells clients to connect to (default: the bound address, 127.0.0.1 for an unspecified host)")
	fs.StringVar(&c.dataDir, "data-dir", "", "`folder` that persists the broker's state across restarts (default: memory only)")
	fs.BoolVar(&c.sync, "sync", false, "fsync every write (durable across a machine crash, slower)")
	fs.Func("broker-config", "broker config `key=value`, e.g. transaction.max.timeout.ms=2000 (repeatable)", func(s string) error {
		k, v, ok := strings.Cut(s, "=")
		if !ok || strings.TrimSpace(k) == "" {
			return fmt.Errorf("want key=value, got %q", s)
		}
		c.brokerConfigs[strings.TrimSpace(k)] = v
		return nil
	})
	fs.BoolVar(&c.repairCrashAborts, "repair-crash-aborts", true, "after a crash, write the ABORT records kfake omits for the transactions it aborts on load (false: kfake's raw behaviour)")
	fs.IntVar(&c.partitions, "partitions", 10, "partitions of a topic created with the default count (-1) or auto-created")
	fs.Func("log-level", "broker log level on stderr: none, error, warn, info or debug (default none)", func(s string) error {
		l, err := parseLogLevel(s)
		c.logLevel = l
		return err
	})
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		err := fmt.Errorf("unexpected arguments %q", fs.Args())
		fmt.Fprintf(stderr, "broker: %v\n", err)
		return nil, err
	}
	var errs []error
	if _, _, err := splitHostPort(c.listen); err != nil {
		errs = append(errs, fmt.Errorf("--listen: %w", err))
	}
	if c.advertise != "" {
		if host, _, err := splitHostPort(c.advertise); err != nil {
			errs = append(errs, fmt.Errorf("--advertise: %w", err))
		} else if host == "" {
			errs = append(errs, fmt.Errorf("--advertise %q: the host is missing", c.advertise))
		}
	}
	if c.partitions < 1 {
		errs = append(errs, fmt.Errorf("--partitions %d: must be at least 1", c.partitions))
	}
	if err := errors.Join(errs...); err != nil {
		fmt.Fprintf(stderr, "broker: %v\n", err)
		return nil, err
	}
	return c, nil
}

func parseLogLevel(s string) (kfake.LogLevel, error) {
	switch strings.ToLower(s) {
	case "none":
		return kfake.LogLevelNone, nil
	case "error":
		return kfake.LogLevelError, nil
	case "warn":
		return kfake.LogLevelWarn, nil
	case "info":
		return kfake.LogLevelInfo, nil
	case "debug":
		return kfake.LogLevelDebug, nil
	}
	return kfake.LogLevelNone, fmt.Errorf("unknown log level %q (want none, error, warn, info or debug)", s)
}

// splitHostPort splits a host:port whose port is a number in 0..65535.
func splitHostPort(addr string) (string, int, error) {
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("%q: bad port %q", addr, p)
	}
	return host, port, nil
}

// run runs the broker until a signal arrives on sigs and returns the exit
// status: 0 after a clean close, 1 when the broker cannot start or a second
// signal forced the exit, 2 for bad flags.
func run(args []string, stdout, stderr io.Writer, sigs <-chan os.Signal) int {
	c, err := parseFlags(args, stderr)
	if err != nil {
		return 2
	}
	cluster, ln, err := start(c, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "broker: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "listening on %s advertised %s\n", ln.Bound(), ln.Addr())

	sig := <-sigs
	fmt.Fprintf(stderr, "broker: %v: shutting down (signal again to force)\n", sig)
	done := make(chan struct{})
	go func() {
		cluster.Close()
		close(done)
	}()
	select {
	case <-done:
		fmt.Fprintln(stderr, "broker: stopped")
		return 0
	case <-sigs:
		fmt.Fprintln(stderr, "broker: forced exit before the state was saved")
		return 1
	}
}

// start binds the listener, starts kfake on it, repairs what a crash left
// (see repairCrashAborts) and then lets clients in.
func start(c *config, stderr io.Writer) (*kfake.Cluster, *listener, error) {
	tcp, err := net.Listen("tcp", c.listen)
	if err != nil {
		return nil, nil, fmt.Errorf("listen on %s: %w", c.listen, err)
	}
	adv, err := advertised(tcp.Addr(), c.advertise)
	if err != nil {
		tcp.Close()
		return nil, nil, err
	}
	ln := newListener(tcp, adv)
	// kfake asks ListenFn for 127.0.0.1:<port>; it gets ln whatever it
	// asks, once (one broker).
	used := false
	opts := []kfake.Opt{
		kfake.NumBrokers(1),
		kfake.DefaultNumPartitions(c.partitions),
		kfake.ListenFn(func(string, string) (net.Listener, error) {
			if used {
				return nil, errors.New("kfake asked for a second listener")
			}
			used = true
			return ln, nil
		}),
		kfake.WithLogger(kfake.BasicLogger(stderr, c.logLevel)),
	}
	if c.dataDir != "" {
		opts = append(opts, kfake.DataDir(c.dataDir))
	}
	if c.sync {
		opts = append(opts, kfake.SyncWrites())
	}
	if len(c.brokerConfigs) > 0 {
		opts = append(opts, kfake.BrokerConfigs(c.brokerConfigs))
	}
	cluster, err := kfake.NewCluster(opts...)
	if err != nil {
		ln.Close()
		return nil, nil, fmt.Errorf("start kfake: %w", err)
	}
	if c.dataDir != "" && c.repairCrashAborts {
		if err := repair(cluster, ln, stderr); err != nil {
			cluster.Close()
			return nil, nil, err
		}
	}
	ln.open()
	return cluster, ln, nil
}

// repair runs repairCrashAborts through an in-process client, before any
// TCP client is let in.
func repair(cluster *kfake.Cluster, ln *listener, stderr io.Writer) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cl, err := kgo.NewClient(kgo.SeedBrokers(ln.Addr().String()), kgo.Dialer(ln.dial))
	if err != nil {
		return err
	}
	defer cl.Close()
	n, err := repairCrashAborts(ctx, cl, func(format string, args ...any) {
		fmt.Fprintf(stderr, "broker: "+format+"\n", args...)
	})
	if err != nil {
		return fmt.Errorf("repair of transactions aborted by a crash (--repair-crash-aborts=false skips it): %w", err)
	}
	if n > 0 {
		fmt.Fprintf(stderr, "broker: wrote %d ABORT records that kfake omitted for transactions it aborted after a crash\n", n)
	}
	return nil
}
