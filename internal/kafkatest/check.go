package kafkatest

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/twmb/franz-go/pkg/kgo"
)

// CheckExactlyOnceInOrder is CheckCounts with a diagnosis: it checks
// separately that out, the output of a running count per key, holds every
// count 1..want[key] of every key exactly once (nothing lost, nothing
// doubled), and that each key's counts come in order, and reports each
// violation with where the records are (partition, offset, producer id and
// epoch), so a reordering across two transactions is told apart from a loss.
func CheckExactlyOnceInOrder(t testing.TB, out []*kgo.Record, want map[string]int64) {
	t.Helper()
	type seen struct {
		n int64
		r *kgo.Record
	}
	byKey := map[string][]seen{}
	for _, r := range out {
		n, err := strconv.ParseInt(string(r.Value), 10, 64)
		if err != nil {
			t.Errorf("output %q=%q at %s is not a count", r.Key, r.Value, where(r))
			return
		}
		byKey[string(r.Key)] = append(byKey[string(r.Key)], seen{n, r})
	}
	var problems []string
	for _, k := range sortedKeys(want, byKey) {
		got := byKey[k]
		at := map[int64][]*kgo.Record{}
		for _, s := range got {
			at[s.n] = append(at[s.n], s.r)
		}
		var missing []int64
		for n := int64(1); n <= want[k]; n++ {
			switch rs := at[n]; {
			case len(rs) == 0:
				missing = append(missing, n)
			case len(rs) > 1:
				var ws []string
				for _, r := range rs {
					ws = append(ws, where(r))
				}
				problems = append(problems, fmt.Sprintf("key %s: count %d output %d times (duplicate) at %s", k, n, len(rs), strings.Join(ws, ", ")))
			}
		}
		if len(missing) > 0 {
			problems = append(problems, fmt.Sprintf("key %s: %d counts lost: %s", k, len(missing), ranges(missing)))
		}
		for _, s := range got {
			if s.n < 1 || s.n > want[k] {
				problems = append(problems, fmt.Sprintf("key %s: count %d beyond the %d inputs, at %s", k, s.n, want[k], where(s.r)))
				break
			}
		}
		for i := 1; i < len(got); i++ {
			if got[i].n <= got[i-1].n {
				prev, cur := got[i-1], got[i]
				hint := ""
				if prev.r.ProducerID != cur.r.ProducerID {
					hint = " (two producers: nothing orders the appends of two transactions on different transactional ids)"
				}
				problems = append(problems, fmt.Sprintf("key %s: out of order: count %d at %s is read after count %d at %s%s",
					k, cur.n, where(cur.r), prev.n, where(prev.r), hint))
				break // the first one of a key says enough
			}
		}
	}
	if len(problems) > 0 {
		const most = 20
		if len(problems) > most {
			problems = append(problems[:most], fmt.Sprintf("... and %d more", len(problems)-most))
		}
		t.Errorf("output is not every input's count exactly once in order:\n\t%s", strings.Join(problems, "\n\t"))
	}
}

// where locates a record: partition, offset, producer id and epoch.
func where(r *kgo.Record) string {
	return fmt.Sprintf("%d@%d (producer %d epoch %d)", r.Partition, r.Offset, r.ProducerID, r.ProducerEpoch)
}

// ranges formats sorted numbers as runs: 1-6, 9.
func ranges(ns []int64) string {
	var parts []string
	for i := 0; i < len(ns); {
		j := i
		for j+1 < len(ns) && ns[j+1] == ns[j]+1 {
			j++
		}
		if i == j {
			parts = append(parts, strconv.FormatInt(ns[i], 10))
		} else {
			parts = append(parts, fmt.Sprintf("%d-%d", ns[i], ns[j]))
		}
		i = j + 1
	}
	return strings.Join(parts, ", ")
}

// sortedKeys returns the keys of both maps, sorted.
func sortedKeys[A, B any](a map[string]A, b map[string]B) []string {
	var keys []string
	for k := range a {
		keys = append(keys, k)
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	return keys
}
