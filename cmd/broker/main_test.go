package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/sluice-stream/sluice/internal/kafkatest"
)

func TestFlags(t *testing.T) {
	c, err := parseFlags([]string{"--broker-config", "transaction.max.timeout.ms=2000", "--broker-config", "message.max.bytes=2000000",
		"--data-dir", "/d", "--sync", "--partitions", "3", "--log-level", "warn"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.listen != "0.0.0.0:9092" || c.advertise != "" || c.dataDir != "/d" || !c.sync || c.partitions != 3 || !c.repairCrashAborts {
		t.Errorf("parsed %+v", c)
	}
	if len(c.brokerConfigs) != 2 || c.brokerConfigs["transaction.max.timeout.ms"] != "2000" || c.brokerConfigs["message.max.bytes"] != "2000000" {
		t.Errorf("broker configs %v", c.brokerConfigs)
	}
	for _, args := range [][]string{
		{"--listen", "nohost"},
		{"--listen", "127.0.0.1:99999"},
		{"--advertise", ":9092"},
		{"--broker-config", "novalue"},
		{"--partitions", "0"},
		{"--log-level", "loud"},
		{"extra"},
		{"--no-such-flag"},
	} {
		var stderr strings.Builder
		if code := run(args, io.Discard, &stderr, nil); code != 2 {
			t.Errorf("%q: exit %d, want 2", args, code)
		}
		if stderr.Len() == 0 {
			t.Errorf("%q: nothing said on stderr", args)
		}
	}
}

func TestAdvertised(t *testing.T) {
	tcp := func(ip string, port int) net.Addr { return &net.TCPAddr{IP: net.ParseIP(ip), Port: port} }
	for _, c := range []struct {
		bound net.Addr
		adv   string
		want  string
	}{
		{tcp("0.0.0.0", 9092), "", "127.0.0.1:9092"},
		{tcp("::", 9092), "", "127.0.0.1:9092"},
		{tcp("127.0.0.1", 4000), "", "127.0.0.1:4000"},
		{tcp("::1", 4000), "", "[::1]:4000"},
		{tcp("0.0.0.0", 9092), "kafka:19092", "kafka:19092"},
		{tcp("0.0.0.0", 4000), "kafka:0", "kafka:4000"},
	} {
		got, err := advertised(c.bound, c.adv)
		if err != nil || string(got) != c.want {
			t.Errorf("advertised(%v, %q) = %q, %v; want %q", c.bound, c.adv, got, err, c.want)
		}
	}
}

// startInProcess runs the broker with args and returns the bound and
// advertised addresses and a stop function that checks the exit status.
func startInProcess(t *testing.T, args ...string) (bound, adv string, stop func()) {
	t.Helper()
	r, w := io.Pipe()
	sigs := make(chan os.Signal, 1)
	code := make(chan int, 1)
	var stderr strings.Builder
	go func() {
		code <- run(args, w, &stderr, sigs)
		w.Close()
	}()
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	select {
	case line := <-lines:
		f := strings.Fields(line)
		if len(f) != 5 || f[0] != "listening" {
			t.Fatalf("first line %q", line)
		}
		bound, adv = f[2], f[4]
	case c := <-code:
		t.Fatalf("broker exited with %d: %s", c, stderr.String())
	case <-time.After(30 * time.Second):
		t.Fatal("broker not listening within 30s")
	}
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		sigs <- os.Interrupt
		select {
		case c := <-code:
			if c != 0 {
				t.Errorf("exit status %d after SIGINT, want 0", c)
			}
		case <-time.After(30 * time.Second):
			t.Error("broker did not stop within 30s of SIGINT")
		}
	}
	t.Cleanup(stop)
	return bound, adv, stop
}

// TestAdvertise checks that clients are told --advertise, not the bound
// address, and that --broker-config and --partitions apply.
func TestAdvertise(t *testing.T) {
	bound, adv, stop := startInProcess(t, "--listen", "127.0.0.1:0", "--advertise", "kafka.invalid:19092",
		"--partitions", "3", "--broker-config", "transaction.max.timeout.ms=2000")
	if adv != "kafka.invalid:19092" {
		t.Fatalf("advertised %s", adv)
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(bound))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	// Only the seed connection works: the advertised name does not resolve.
	seed := cl.SeedBrokers()[0]
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	md, err := seed.Request(ctx, kmsg.NewPtrMetadataRequest())
	if err != nil {
		t.Fatal(err)
	}
	brokers := md.(*kmsg.MetadataResponse).Brokers
	if len(brokers) != 1 || brokers[0].Host != "kafka.invalid" || brokers[0].Port != 19092 {
		t.Errorf("metadata brokers %+v, want kafka.invalid:19092", brokers)
	}
	fc := kmsg.NewPtrFindCoordinatorRequest()
	fc.CoordinatorKey = "g"
	fc.CoordinatorKeys = []string{"g"}
	resp, err := seed.Request(ctx, fc)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range resp.(*kmsg.FindCoordinatorResponse).Coordinators {
		if c.Host != "kafka.invalid" || c.Port != 19092 {
			t.Errorf("coordinator at %s:%d, want kafka.invalid:19092", c.Host, c.Port)
		}
	}

	dc := kmsg.NewPtrDescribeConfigsRequest()
	rc := kmsg.NewDescribeConfigsRequestResource()
	rc.ResourceType = kmsg.ConfigResourceTypeBroker
	rc.ResourceName = "0"
	rc.ConfigNames = []string{"transaction.max.timeout.ms"}
	dc.Resources = append(dc.Resources, rc)
	resp, err = seed.Request(ctx, dc)
	if err != nil {
		t.Fatal(err)
	}
	var got string
	for _, r := range resp.(*kmsg.DescribeConfigsResponse).Resources {
		for _, c := range r.Configs {
			if c.Name == "transaction.max.timeout.ms" && c.Value != nil {
				got = *c.Value
			}
		}
	}
	if got != "2000" {
		t.Errorf("transaction.max.timeout.ms = %q, want 2000", got)
	}

	ct := kmsg.NewPtrCreateTopicsRequest()
	tp := kmsg.NewCreateTopicsRequestTopic()
	tp.Topic, tp.NumPartitions, tp.ReplicationFactor = "t", -1, -1
	ct.Topics = append(ct.Topics, tp)
	ct.TimeoutMillis = 5000
	resp, err = seed.Request(ctx, ct)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range resp.(*kmsg.CreateTopicsResponse).Topics {
		if err := kerr.ErrorForCode(r.ErrorCode); err != nil || r.NumPartitions != 3 {
			t.Errorf("create topic with the default count: %v, %d partitions, want 3", err, r.NumPartitions)
		}
	}
	stop()
}

// TestDefaultAdvertise listens on every interface and checks that an
// ordinary client works through the default advertised address.
func TestDefaultAdvertise(t *testing.T) {
	bound, adv, _ := startInProcess(t, "--listen", "0.0.0.0:0")
	_, port, _ := net.SplitHostPort(bound)
	if adv != "127.0.0.1:"+port {
		t.Fatalf("bound %s advertised %s, want 127.0.0.1:%s", bound, adv, port)
	}
	kafkatest.CreateTopics(t, adv, 1, "t")
	cl := kafkatest.Client(t, adv, kgo.DefaultProduceTopic("t"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := cl.ProduceSync(ctx, kgo.StringRecord("v")).FirstErr(); err != nil {
		t.Fatal(err)
	}
}

// TestCrashAbortRepair: a transaction open when the broker is killed is
// aborted on restart with an ABORT control record, and a later committed
// transaction of the same transactional id (same producer id) is visible to
// read_committed readers. Without the repair (kfake's raw behaviour) that
// committed record is hidden.
func TestCrashAbortRepair(t *testing.T) {
	bin := kafkatest.BuildBroker(t)
	for _, repair := range []bool{true, false} {
		t.Run("repair="+strconv.FormatBool(repair), func(t *testing.T) {
			b := kafkatest.StartBrokerProcess(t, bin, t.TempDir(), "--repair-crash-aborts="+strconv.FormatBool(repair))
			kafkatest.CreateTopics(t, b.Addr, 1, "t")
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()

			tx := txnClient(t, b.Addr, "x")
			mustCommit(t, ctx, tx, "a")
			if err := tx.BeginTransaction(); err != nil {
				t.Fatal(err)
			}
			open, err := tx.ProduceSync(ctx, kgo.StringRecord("b")).First()
			if err != nil {
				t.Fatal(err)
			}
			if err := b.Kill(); err != nil {
				t.Fatal(err)
			}
			tx.Close()
			if err := b.Restart(); err != nil {
				t.Fatal(err)
			}

			tx2 := txnClient(t, b.Addr, "x")
			mustCommit(t, ctx, tx2, "c")
			pid, _, err := tx2.ProducerID(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if pid != open.ProducerID {
				t.Fatalf("producer id %d after the restart, %d before: the check below needs the same", pid, open.ProducerID)
			}

			committed := readValues(t, b.Addr, "t", kgo.ReadCommitted())
			all := readValues(t, b.Addr, "t", kgo.ReadUncommitted())
			t.Logf("read_uncommitted: %v; read_committed: %v", all, committed)
			if !repair {
				// The COMMIT record of c's transaction shows, c does not.
				if strings.Join(committed, " ") != "a COMMIT COMMIT" {
					t.Errorf("kfake without the repair: read_committed sees %v; it used to hide the committed record c (no ABORT record after a crash). If kfake now writes the ABORT records itself, the repair in repair.go has nothing left to do", committed)
				}
				return
			}
			if want := "a COMMIT b ABORT c COMMIT"; strings.Join(all, " ") != want {
				t.Errorf("log %v, want %s", all, want)
			}
			if want := "a COMMIT ABORT c COMMIT"; strings.Join(committed, " ") != want {
				t.Errorf("read_committed sees %v, want %s", committed, want)
			}
			if !strings.Contains(b.Output(), "wrote the ABORT record") {
				t.Errorf("broker did not report the repair:\n%s", b.Output())
			}

			// A restart after a clean stop repairs nothing more.
			if err := b.Stop(); err != nil {
				t.Fatal(err)
			}
			if err := b.Restart(); err != nil {
				t.Fatal(err)
			}
			if got := strings.Count(b.Output(), "wrote the ABORT record"); got != 1 {
				t.Errorf("%d repairs reported after a second restart, want 1:\n%s", got, b.Output())
			}
		})
	}
}

// TestCleanStopKeepsOpenTransaction: after SIGTERM the data folder keeps an
// open transaction open (the repair must leave it alone), and a raw EndTxn
// with the recorded producer id and epoch commits it.
func TestCleanStopKeepsOpenTransaction(t *testing.T) {
	b := kafkatest.StartBrokerProcess(t, kafkatest.BuildBroker(t), t.TempDir())
	kafkatest.CreateTopics(t, b.Addr, 1, "t")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tx := txnClient(t, b.Addr, "x")
	mustCommit(t, ctx, tx, "a")
	if err := tx.BeginTransaction(); err != nil {
		t.Fatal(err)
	}
	open, err := tx.ProduceSync(ctx, kgo.StringRecord("b")).First()
	if err != nil {
		t.Fatal(err)
	}
	tx.Close()
	if err := b.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := b.Restart(); err != nil {
		t.Fatal(err)
	}
	adm := kadm.NewClient(kafkatest.Client(t, b.Addr))
	dts, err := adm.DescribeTransactions(ctx, "x")
	if err != nil {
		t.Fatal(err)
	}
	if d := dts["x"]; d.State != "Ongoing" {
		t.Fatalf("transaction after a clean restart: %+v, want Ongoing", d)
	}
	req := kmsg.NewPtrEndTxnRequest()
	req.TransactionalID = "x"
	req.ProducerID, req.ProducerEpoch = open.ProducerID, open.ProducerEpoch
	req.Commit = true
	resp, err := req.RequestWith(ctx, kafkatest.Client(t, b.Addr))
	if err == nil {
		err = kerr.ErrorForCode(resp.ErrorCode)
	}
	if err != nil {
		t.Fatalf("resume the commit: %v", err)
	}
	if got := strings.Join(readValues(t, b.Addr, "t", kgo.ReadCommitted()), " "); got != "a COMMIT b COMMIT" {
		t.Errorf("read_committed sees %s, want a COMMIT b COMMIT", got)
	}
	if strings.Contains(b.Output(), "wrote the ABORT record") {
		t.Errorf("the repair touched an open transaction:\n%s", b.Output())
	}
}

func txnClient(t *testing.T, addr, id string) *kgo.Client {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(addr), kgo.TransactionalID(id), kgo.DefaultProduceTopic("t"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return cl
}

func mustCommit(t *testing.T, ctx context.Context, cl *kgo.Client, value string) {
	t.Helper()
	if err := cl.BeginTransaction(); err != nil {
		t.Fatal(err)
	}
	if err := cl.ProduceSync(ctx, kgo.StringRecord(value)).FirstErr(); err != nil {
		t.Fatal(err)
	}
	if err := cl.EndTransaction(ctx, kgo.TryCommit); err != nil {
		t.Fatal(err)
	}
}

// readValues reads partition 0 of topic to its high watermark with control
// records kept, as values and COMMIT / ABORT for control records.
func readValues(t *testing.T, addr, topic string, iso kgo.IsolationLevel) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	adm := kadm.NewClient(kafkatest.Client(t, addr))
	ends, err := adm.ListEndOffsets(ctx, topic)
	if err != nil {
		t.Fatal(err)
	}
	end, _ := ends.Lookup(topic, 0)
	cl := kafkatest.Client(t, addr, kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: {0: kgo.NewOffset().AtStart()}}),
		kgo.FetchIsolationLevel(iso), kgo.KeepControlRecords())
	var out []string
	for last := int64(-1); last < end.Offset-1; {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("read %s to offset %d: got to %d: %v", topic, end.Offset-1, last, out)
		}
		fs.EachRecord(func(r *kgo.Record) {
			last = r.Offset
			if !r.Attrs.IsControl() {
				out = append(out, string(r.Value))
				return
			}
			var key kmsg.ControlRecordKey
			if err := key.ReadFrom(r.Key); err != nil {
				out = append(out, fmt.Sprintf("control?%x", r.Key))
				return
			}
			out = append(out, map[kmsg.ControlRecordKeyType]string{kmsg.ControlRecordKeyTypeCommit: "COMMIT", kmsg.ControlRecordKeyTypeAbort: "ABORT"}[key.Type])
		})
	}
	return out
}
