package main

import (
	"bufio"
	"context"
	"fmt"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

func startBin(t *testing.T, args ...string) (*exec.Cmd, string) {
	cmd := exec.Command("/tmp/bk/broker", args...)
	out, _ := cmd.StdoutPipe()
	cmd.Stderr = nil
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	sc.Scan()
	f := strings.Fields(sc.Text())
	return cmd, f[2]
}

func TestZZExp(t *testing.T) {
	dir := t.TempDir()
	cmd, addr := startBin(t, "--listen", "127.0.0.1:0", "--data-dir", dir)
	t.Log(addr)
	ctx := context.Background()
	adm := kadm.NewClient(mustClient(t, addr))
	if _, err := adm.CreateTopic(ctx, 1, 1, nil, "out"); err != nil {
		t.Fatal(err)
	}
	tx, _ := kgo.NewClient(kgo.SeedBrokers(addr), kgo.TransactionalID("t1"), kgo.DefaultProduceTopic("out"))
	tx.BeginTransaction()
	tx.ProduceSync(ctx, kgo.StringRecord("a"))
	tx.EndTransaction(ctx, kgo.TryCommit)
	tx.BeginTransaction()
	r := tx.ProduceSync(ctx, kgo.StringRecord("b"), kgo.StringRecord("c"))
	rec, _ := r.First()
	pid, ep := rec.ProducerID, rec.ProducerEpoch
	t.Logf("open txn pid %d epoch %d offset %d", pid, ep, rec.Offset)
	lt, err := adm.DescribeTransactions(ctx, "t1")
	t.Logf("before kill: %+v %v", lt, err)
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	tx.Close()
	cmd, _ = startBin(t, "--listen", addr, "--data-dir", dir)
	defer func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() }()
	adm = kadm.NewClient(mustClient(t, addr))
	for i := 0; i < 3; i++ {
		lt, err = adm.DescribeTransactions(ctx, "t1")
		t.Logf("after restart: %+v %v", lt, err)
		ls, err := adm.ListTransactions(ctx, nil, nil)
		t.Logf("list: %+v %v", ls, err)
		dump(t, addr, 0)
		dump(t, addr, 1)
		time.Sleep(time.Second)
	}
	req := kmsg.NewPtrEndTxnRequest()
	req.TransactionalID = "t1"
	req.ProducerID = pid
	req.ProducerEpoch = ep
	req.Commit = true
	resp, err := req.RequestWith(ctx, mustClient(t, addr))
	t.Logf("endtxn: %v %v", err, kerr.ErrorForCode(resp.ErrorCode))
	dump(t, addr, 0)
	ip := kmsg.NewPtrInitProducerIDRequest()
	ip.TransactionalID = kmsg.StringPtr("t1")
	ip.TransactionTimeoutMillis = 10000
	ip.ProducerID, ip.ProducerEpoch = -1, -1
	ir, err := ip.RequestWith(ctx, mustClient(t, addr))
	t.Logf("initpid: %v %v pid %d epoch %d", err, kerr.ErrorForCode(ir.ErrorCode), ir.ProducerID, ir.ProducerEpoch)
	dump(t, addr, 0)
	dump(t, addr, 1)
}

func mustClient(t *testing.T, addr string) *kgo.Client {
	cl, err := kgo.NewClient(kgo.SeedBrokers(addr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return cl
}

func dump(t *testing.T, addr string, iso int8) {
	lvl := kgo.ReadUncommitted()
	if iso == 1 {
		lvl = kgo.ReadCommitted()
	}
	cl, _ := kgo.NewClient(kgo.SeedBrokers(addr), kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{"out": {0: kgo.NewOffset().AtStart()}}),
		kgo.FetchIsolationLevel(lvl), kgo.KeepControlRecords())
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var s []string
	for {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			break
		}
		fs.EachRecord(func(r *kgo.Record) {
			s = append(s, fmt.Sprintf("%d:%q ctl=%v pid=%d/%d", r.Offset, r.Value, r.Attrs.IsControl(), r.ProducerID, r.ProducerEpoch))
		})
	}
	t.Logf("iso %d: %v", iso, s)
}
