// Command processor runs Sluice's example job: a keyed running count.
//
//	processor demo   everything embedded: a Kafka broker, an event generator
//	                 and the count job, with progress every second
//	processor run    the count job against external brokers
//
// and the tools of every Sluice binary (service.ToolCommand): savepoint,
// savepoint dispose, savepoints list, checkpoints list, state dump.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/sluice-stream/sluice/internal/example"
	"github.com/sluice-stream/sluice/operators"
	"github.com/sluice-stream/sluice/service"
)

var usage = `usage: processor <command> [flags]

commands:
  demo   run the count job on an embedded Kafka broker with generated input
  run    run the count job against external brokers (see processor run -h)

tools:
` + service.ToolUsage()

func main() {
	os.Exit(dispatch(os.Args[1:], os.Stdout, os.Stderr))
}

func dispatch(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "demo":
		return demo(args[1:], stdout, stderr)
	case "run":
		return run(args[1:], stderr)
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	if service.IsToolCommand(args[0]) {
		return service.ToolCommand(args, stdout, stderr)
	}
	fmt.Fprintf(stderr, "unknown command %q\n%s", args[0], usage)
	return 2
}

// run runs the example job against external brokers.
func run(args []string, stderr io.Writer) int {
	return service.RunCommand(args, stderr, func(fs *flag.FlagSet) func() *operators.Job {
		job := fs.String("job", "counts", "job name: consumer group and checkpoint root")
		input := fs.String("input", "events", "input topic")
		output := fs.String("output", "counts", "output topic")
		return func() *operators.Job { return example.CountJob(*job, *input, *output) }
	})
}
