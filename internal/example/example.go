// Package example holds the example job that `processor demo` and
// `processor run` run and the tests exercise: a keyed running count.
package example

import (
	"strconv"

	"github.com/sluice-stream/sluice/operators"
	"github.com/sluice-stream/sluice/state"
)

// Count is the running count of one key.
type Count struct {
	Key string
	N   int64
}

// CountState is the count job's state: the running count per key under the
// operator uid "count".
var CountState = state.NewValueState[int64]("count", state.Int64)

// CountOperator is the uid of the counting operator.
const CountOperator = "count"

// CountJob counts the records of input per record key and writes every new
// count to output: key = the input key, value = the count as decimal text.
func CountJob(name, input, output string) *operators.Job {
	job := operators.NewJob(name)
	events := operators.FromKafka(job, input, operators.Strings)
	byKey := operators.KeyBy(events, func(m operators.Message) string { return m.Key }, state.String)
	counts := operators.Process(byKey, CountOperator, func(ctx *operators.Context[string], _ operators.Message, out func(Count)) error {
		n, _, err := CountState.Get(ctx.State())
		if err != nil {
			return err
		}
		n++
		if err := CountState.Set(ctx.State(), n); err != nil {
			return err
		}
		out(Count{Key: ctx.Key(), N: n})
		return nil
	})
	operators.ToKafka(counts, output, func(c Count) ([]byte, []byte, error) {
		return []byte(c.Key), strconv.AppendInt(nil, c.N, 10), nil
	})
	return job
}
