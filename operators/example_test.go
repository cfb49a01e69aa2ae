package operators_test

import (
	"fmt"
	"strconv"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/sluice-stream/sluice/operators"
	"github.com/sluice-stream/sluice/state"
)

// The running count of events per user: input topic "events" keyed by user
// id, output topic "counts" with the user id as key and the count as decimal
// text. The records are keyed by the user id, so keyed state per task is
// correct.
func Example() {
	job := operators.NewJob("counts")
	events := operators.FromKafka(job, "events", operators.Strings)
	byUser := operators.KeyBy(events, func(m operators.Message) string { return m.Key }, state.String)
	count := state.NewValueState("count", state.Int64)
	counts := operators.Process(byUser, "count-per-user",
		func(ctx *operators.Context[string], _ operators.Message, out func(userCount)) error {
			n, _, err := count.Get(ctx.State())
			if err != nil {
				return err
			}
			n++
			out(userCount{user: ctx.Key(), n: n})
			return count.Set(ctx.State(), n)
		})
	operators.ToKafka(counts, "counts", func(c userCount) ([]byte, []byte, error) {
		return []byte(c.user), strconv.AppendInt(nil, c.n, 10), nil
	})

	// What the runtime does for each task it owns.
	backend, _ := state.NewMemoryFactory().Open("")
	w := &recorder{}
	chain, err := job.Build(operators.TaskEnv{Task: 0, Store: state.NewStore(backend), Out: w})
	if err != nil {
		fmt.Println(err)
		return
	}
	for i, user := range []string{"ann", "bo", "ann"} {
		if err := chain(&kgo.Record{Topic: "events", Offset: int64(i), Key: []byte(user)}); err != nil {
			fmt.Println(err)
			return
		}
	}
	for _, line := range w.lines() {
		fmt.Println(line)
	}
	// Output:
	// counts ann=1
	// counts bo=1
	// counts ann=2
}
