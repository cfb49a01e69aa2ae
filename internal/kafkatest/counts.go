package kafkatest

import (
	"strconv"
	"strings"
	"testing"

	"github.com/sluice-stream/sluice/internal/example"
	"github.com/sluice-stream/sluice/state"
)

// KeyPartition returns the partition p of a key made by Key(p, i).
func KeyPartition(key string) (int32, bool) {
	rest, ok := strings.CutPrefix(key, "user-")
	if !ok {
		return 0, false
	}
	ps, _, ok := strings.Cut(rest, "-")
	if !ok {
		return 0, false
	}
	p, err := strconv.ParseInt(ps, 10, 32)
	if err != nil {
		return 0, false
	}
	return int32(p), true
}

// CheckCountState asserts that store, the state of task p of the count job
// (internal/example) as a task restores it from a checkpoint, holds for every
// key of partition p exactly its true count in want: the state neither lost
// nor double-counted an input record.
func CheckCountState(t testing.TB, store *state.Store, p int32, want map[string]int64) {
	t.Helper()
	checked := 0
	for k, n := range want {
		if kp, ok := KeyPartition(k); !ok || kp != p {
			continue
		}
		sc := &state.Scope{Store: store, Operator: example.CountOperator, Key: []byte(k)}
		got, _, err := example.CountState.Get(sc)
		if err != nil {
			t.Fatalf("task %d key %s: read state: %v", p, k, err)
		}
		if got != n {
			t.Fatalf("task %d key %s: state holds count %d, want %d", p, k, got, n)
		}
		checked++
	}
	if checked == 0 {
		t.Fatalf("task %d: no key of want belongs to it", p)
	}
}
