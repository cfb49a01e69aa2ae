package service_test

import (
	"context"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"

	"github.com/sluice-stream/sluice/internal/kafkatest"
)

// TestE2EOffsetsCommittedToGroup checks that completed checkpoints' offsets
// reach the consumer group (for lag monitoring), as a group member, and that
// --commit-offsets=false keeps them out.
func TestE2EOffsetsCommittedToGroup(t *testing.T) {
	for _, commit := range []bool{true, false} {
		t.Run(map[bool]string{true: "on", false: "off"}[commit], func(t *testing.T) {
			e := newE2EEnv(t, 2)
			want := kafkatest.ProduceKeyed(t, e.addr, e2eInput, 2, 100)
			c := e.config()
			c.Settings.CommitOffsets = commit
			j := e2eStart(t, c, e2eLogger(t))
			adm := kadm.NewClient(kafkatest.Client(t, e.addr))
			committedAtEnd := func() bool {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				got, err := adm.FetchOffsets(ctx, e2eJob)
				if err != nil {
					return false
				}
				for p := range int32(2) {
					o, ok := got.Lookup(e2eInput, p)
					if !ok || o.At != 100 {
						return false
					}
				}
				return true
			}
			if commit {
				e2eWaitFor(t, 30*time.Second, "the group's committed offsets to reach the end of the input", committedAtEnd)
			} else {
				e2eWaitFor(t, 30*time.Second, "every task to checkpoint the whole input", func() bool {
					return j.stats(t, 0).LastCheckpointID.Load() > 0 && j.stats(t, 1).LastCheckpointID.Load() > 0 &&
						j.stats(t, 0).RecordsIn.Load() == 100 && j.stats(t, 1).RecordsIn.Load() == 100
				})
			}
			if err := j.stop(); err != nil {
				t.Fatal(err)
			}
			if !commit && committedAtEnd() {
				t.Fatal("offsets were committed to the group with commit-offsets off")
			}
			kafkatest.CheckCounts(t, kafkatest.ReadCommitted(t, e.addr, e2eOutput, 2, 30*time.Second), want)
		})
	}
}
