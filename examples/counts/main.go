// Command counts is the README's complete example job: a keyed running count
// in about twenty lines, with Sluice's whole command line from service.Main.
package main

import (
	"strconv"

	"github.com/sluice-stream/sluice/operators"
	"github.com/sluice-stream/sluice/service"
	"github.com/sluice-stream/sluice/state"
)

var count = state.NewValueState("count", state.Int64)

func main() {
	job := operators.NewJob("counts")
	events := operators.FromKafka(job, "events", operators.Strings)
	byUser := operators.KeyBy(events, func(m operators.Message) string { return m.Key }, state.String)
	counts := operators.Process(byUser, "count", func(ctx *operators.Context[string], _ operators.Message, out func(string)) error {
		n, _, err := count.Get(ctx.State())
		if err != nil {
			return err
		}
		out(strconv.FormatInt(n+1, 10))
		return count.Set(ctx.State(), n+1)
	})
	operators.ToKafka(counts, "counts", func(n string) ([]byte, []byte, error) { return nil, []byte(n), nil })
	service.Main(job) // `./job run --brokers ... --checkpoint-dir ...`
}
