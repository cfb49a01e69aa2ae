package kafkatest

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// Kcat returns the path of Debian's kcat (librdkafka), the reader that
// shares no code with Sluice or franz-go. In CI (CI=true) a missing kcat
// fails the test; elsewhere ok is false and the caller skips its check.
func Kcat(t testing.TB) (path string, ok bool) {
	t.Helper()
	path, err := exec.LookPath("kcat")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("kcat is not installed; CI must have it (apt-get install -y kcat)")
		}
		return "", false
	}
	return path, true
}

// KcatRead reads topic from its beginning to its end with kcat and the given
// isolation level ("read_committed" or "read_uncommitted"), leaving out
// ReadCommitted's sentinel records.
func KcatRead(t testing.TB, kcat, addr, topic, isolation string, timeout time.Duration) []*kgo.Record {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, kcat, "-b", addr, "-C", "-t", topic, "-X", "isolation.level="+isolation,
		"-o", "beginning", "-e", "-q", "-f", "%p %o %k %s\n")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("kcat %s: %v\n%s", isolation, err, stderr.String())
	}
	var recs []*kgo.Record
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 4 {
			t.Fatalf("kcat line %q: want partition, offset, key, value", sc.Text())
		}
		p, err1 := strconv.ParseInt(f[0], 10, 32)
		o, err2 := strconv.ParseInt(f[1], 10, 64)
		if err1 != nil || err2 != nil {
			t.Fatalf("kcat line %q: bad partition or offset", sc.Text())
		}
		if f[2] == SentinelKey {
			continue
		}
		recs = append(recs, &kgo.Record{Partition: int32(p), Offset: o, Key: []byte(f[2]), Value: []byte(f[3])})
	}
	return recs
}
