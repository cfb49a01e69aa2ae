package service

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"

	"github.com/sluice-stream/sluice/coordinator"
	"github.com/sluice-stream/sluice/operators"
)

// Tool commands work on a job's checkpoint storage instead of running the
// job: `checkpoints list`, and more to come. Each lives in its own file and
// registers itself from an init function:
//
//	func init() {
//		registerTool(tool{
//			name:    "savepoints list",
//			summary: "list the savepoints of a job",
//			run:     savepointsList,
//		})
//	}
//
// A tool's name is one or more words; ToolCommand picks the tool whose
// words start the command line and hands it the remaining arguments. Flag
// errors exit with status 2, other failures with 1.

// tool is one tool command.
type tool struct {
	// name is its words, such as "checkpoints list".
	name string
	// summary is one line for the usage.
	summary string
	// run runs it with the arguments after its name and returns the exit
	// status.
	run func(ctx context.Context, args []string, env toolEnv) int
}

// toolEnv is what a tool runs with besides its arguments.
type toolEnv struct {
	stdout, stderr io.Writer
	// job is the binary's own job when it has one (service.Main), nil in a
	// binary that builds its job from flags (cmd/processor). It gives --job
	// its default.
	job *operators.Job
}

// jobName is the default of --job: the binary's job's name, if any.
func (e toolEnv) jobName() string {
	if e.job == nil {
		return ""
	}
	return e.job.Name()
}

// tools are the registered tool commands, by name.
var tools = map[string]tool{}

// registerTool adds a tool command; it panics on a name used twice (a
// programming error found at start).
func registerTool(t tool) {
	if t.name == "" || t.run == nil {
		panic("service: tool without name or run function")
	}
	if _, dup := tools[t.name]; dup {
		panic("service: tool " + t.name + " registered twice")
	}
	tools[t.name] = t
}

// IsToolCommand reports whether command, the first word of a command line,
// starts a tool command such as `checkpoints list`: ToolCommand runs those.
func IsToolCommand(command string) bool {
	for name := range tools {
		if first, _, _ := strings.Cut(name, " "); first == command {
			return true
		}
	}
	return false
}

// ToolUsage lists the tool commands, one per line, indented for a usage
// text's command list.
func ToolUsage() string {
	names := slices.Sorted(func(yield func(string) bool) {
		for name := range tools {
			if !yield(name) {
				return
			}
		}
	})
	width := 0
	for _, n := range names {
		width = max(width, len(n))
	}
	var b strings.Builder
	for _, n := range names {
		fmt.Fprintf(&b, "  %-*s  %s\n", width, n, tools[n].summary)
	}
	return b.String()
}

// ToolCommand runs the tool command of args, such as
// ["checkpoints", "list", "--job", "counts"], until it finishes or the
// process gets SIGINT or SIGTERM, and returns the exit status: 0, 1 if it
// failed, 2 for a bad command line. A binary's main dispatches to it for
// every first word IsToolCommand accepts.
func ToolCommand(args []string, stdout, stderr io.Writer) int {
	return runTool(args, toolEnv{stdout: stdout, stderr: stderr})
}

// runTool is ToolCommand in env.
func runTool(args []string, env toolEnv) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return dispatchTool(ctx, args, env)
}

// dispatchTool finds the tool whose name is the longest run of args' first
// words and runs it.
func dispatchTool(ctx context.Context, args []string, env toolEnv) int {
	for n := len(args); n > 0; n-- {
		if t, ok := tools[strings.Join(args[:n], " ")]; ok {
			return t.run(ctx, args[n:], env)
		}
	}
	// No tool matched: show those that start like args.
	var group string
	if len(args) > 0 {
		group = args[0]
	}
	var names []string
	for name := range tools {
		if strings.HasPrefix(name, group+" ") || name == group {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	if len(names) == 0 {
		fmt.Fprintf(env.stderr, "unknown command %q\n", strings.Join(args, " "))
		return 2
	}
	w, status := env.stderr, 2
	if len(args) == 2 && (args[1] == "-h" || args[1] == "-help" || args[1] == "--help" || args[1] == "help") {
		w, status = env.stdout, 0
	} else if len(args) > 1 {
		fmt.Fprintf(w, "unknown command %q\n", strings.Join(args[:2], " "))
	}
	fmt.Fprintf(w, "usage: %s %s <command> [flags]\n\ncommands:\n", progName(), group)
	for _, name := range names {
		fmt.Fprintf(w, "  %s  %s\n", name, tools[name].summary)
	}
	return status
}

// progName is the binary's name for usage texts.
func progName() string { return filepath.Base(os.Args[0]) }

// newToolFlags returns the flag set of tool t: errors and -h go to env's
// stderr, with a usage line made of synopsis and the tool's summary.
func newToolFlags(t string, synopsis string, env toolEnv) *flag.FlagSet {
	fs := flag.NewFlagSet(t, flag.ContinueOnError)
	fs.SetOutput(env.stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: %s %s %s\n\n%s\n\nflags:\n", progName(), t, synopsis, tools[t].summary)
		fs.PrintDefaults()
	}
	return fs
}

// parseToolFlags parses args and reports the exit status to return if the
// tool should stop: 0 after -h, 2 for a bad flag or a stray argument.
func parseToolFlags(fs *flag.FlagSet, args []string) (status int, stop bool) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0, true
		}
		return 2, true
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "%s: unexpected arguments %q\n", fs.Name(), fs.Args())
		return 2, true
	}
	return 0, false
}

// registerStorageFlags defines --checkpoint-dir and the S3 flags that
// locate a job's checkpoint storage, writing into dir and o.
func registerStorageFlags(fs *flag.FlagSet, dir *string, o *coordinator.StorageOptions) {
	fs.StringVar(dir, "checkpoint-dir", *dir, "where checkpoints are stored: a local directory, file:///path or s3://bucket/prefix (S3 credentials come from the standard AWS chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws, IAM roles)")
	registerS3Flags(fs, o)
}

// registerS3Flags defines the S3 flags of a command that takes a location
// argument instead of --checkpoint-dir.
func registerS3Flags(fs *flag.FlagSet, o *coordinator.StorageOptions) {
	fs.StringVar(&o.Endpoint, "s3-endpoint", o.Endpoint, "base URL of an S3-compatible store for s3:// locations, such as http://127.0.0.1:9000 (default: AWS S3)")
	fs.StringVar(&o.Region, "s3-region", o.Region, "region of the S3 bucket (default: AWS_REGION or the AWS config file, else us-east-1)")
	fs.BoolVar(&o.PathStyle, "s3-path-style", o.PathStyle, "address the bucket in the URL path (http://host/bucket/key), as MinIO and most self-hosted stores need")
}

// checkStorageFlags reports what is wrong with the storage flags, without
// touching the storage: a malformed location, or S3 flags given for a
// location that is not in S3 (most likely a forgotten s3://).
func checkStorageFlags(dir string, o coordinator.StorageOptions) error {
	if dir == "" {
		return errors.New("--checkpoint-dir must not be empty")
	}
	if err := coordinator.ValidateLocation(dir); err != nil {
		return fmt.Errorf("--checkpoint-dir: %w", err)
	}
	if !strings.HasPrefix(strings.ToLower(dir), "s3://") {
		var set []string
		if o.Endpoint != "" {
			set = append(set, "--s3-endpoint")
		}
		if o.Region != "" {
			set = append(set, "--s3-region")
		}
		if o.PathStyle {
			set = append(set, "--s3-path-style")
		}
		if len(set) > 0 {
			return fmt.Errorf("%s given, but --checkpoint-dir %q is not an s3://bucket/prefix location", strings.Join(set, ", "), dir)
		}
	}
	return nil
}

// writeTable writes rows as a text table with aligned columns.
func writeTable(w io.Writer, header []string, rows [][]string) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	return tw.Flush()
}

// formatBytes writes a size the way people read it: 812 B, 1.5 KiB, 3.2 GiB.
func formatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func init() {
	registerTool(tool{
		name:    "checkpoints list",
		summary: "list the complete checkpoints of each task of a job, newest first",
		run:     checkpointsList,
	})
}

// checkpointStatus says whether a listed checkpoint's metadata could be read.
type checkpointStatus string

const (
	// statusComplete: the metadata was read and verified.
	statusComplete checkpointStatus = "complete"
	// statusCorrupt: the metadata exists but cannot be trusted (bad
	// checksum, truncated, not describing its own path); tasks skip it.
	statusCorrupt checkpointStatus = "corrupt"
	// statusUnsupported: metadata of a version this build cannot read,
	// written by a newer Sluice.
	statusUnsupported checkpointStatus = "unsupported"
	// statusUnreadable: the storage failed to return the metadata; the
	// listing is incomplete.
	statusUnreadable checkpointStatus = "unreadable"
)

// listedCheckpoint is one line of `checkpoints list`: a checkpoint whose
// _metadata exists, read or not.
type listedCheckpoint struct {
	Task   int32
	ID     int64
	Status checkpointStatus
	C      *coordinator.Checkpoint // nil unless Status is complete
	Err    error                   // nil if Status is complete
}

// checkpointJSON is the --json form of a listedCheckpoint: fields of the
// metadata only when it was read, the error otherwise.
type checkpointJSON struct {
	Job              string           `json:"job"`
	Task             int32            `json:"task"`
	ID               int64            `json:"id"`
	Status           checkpointStatus `json:"status"`
	Kind             coordinator.Kind `json:"kind,omitempty"`
	Owner            string           `json:"owner,omitempty"`
	CreatedAt        string           `json:"created_at,omitempty"`
	Offsets          map[string]int64 `json:"offsets,omitempty"`
	CommittedOffsets map[string]int64 `json:"committed_offsets,omitempty"`
	Files            *int             `json:"files,omitempty"`
	SizeBytes        *int64           `json:"size_bytes,omitempty"`
	Pending          *int             `json:"pending_transactions,omitempty"`
	Error            string           `json:"error,omitempty"`
}

// createdFormat is how checkpoint creation times are shown: UTC, with
// milliseconds, since checkpoints may be less than a second apart.
const createdFormat = "2006-01-02T15:04:05.000Z07:00"

func (l listedCheckpoint) json(job string) checkpointJSON {
	j := checkpointJSON{Job: job, Task: l.Task, ID: l.ID, Status: l.Status}
	if l.Err != nil {
		j.Error = l.Err.Error()
	}
	if c := l.C; c != nil {
		files, size, pending := len(c.Files), checkpointSize(c), len(c.Pending)
		j.Kind, j.Owner, j.CreatedAt = c.Kind, c.Owner, c.CreatedAt.UTC().Format(createdFormat)
		j.Offsets, j.CommittedOffsets = c.Offsets, c.CommittedOffsets
		j.Files, j.SizeBytes, j.Pending = &files, &size, &pending
	}
	return j
}

// checkpointSize is the full size of a checkpoint's state: every file it
// references, shared with other checkpoints or not.
func checkpointSize(c *coordinator.Checkpoint) int64 {
	var n int64
	for _, f := range c.Files {
		n += f.Size
	}
	return n
}

// formatOffsets writes offsets as "topic=offset,..." in topic order.
func formatOffsets(offsets map[string]int64) string {
	if len(offsets) == 0 {
		return "-"
	}
	topics := make([]string, 0, len(offsets))
	for t := range offsets {
		topics = append(topics, t)
	}
	slices.Sort(topics)
	parts := make([]string, len(topics))
	for i, t := range topics {
		parts[i] = fmt.Sprintf("%s=%d", t, offsets[t])
	}
	return strings.Join(parts, ",")
}

// checkpointsList is `checkpoints list`: per task of the job, its complete
// checkpoints newest first, as a table or JSON lines. Metadata that cannot
// be read is listed with its status and error rather than failing the
// listing; the status is 1 only if the storage failed (the listing is then
// incomplete), not for corrupt metadata, which tasks skip by design.
func checkpointsList(ctx context.Context, args []string, env toolEnv) int {
	const name = "checkpoints list"
	dir := DefaultConfig().CheckpointDir
	var opts coordinator.StorageOptions
	fs := newToolFlags(name, "--checkpoint-dir LOCATION --job NAME [flags]", env)
	registerStorageFlags(fs, &dir, &opts)
	job := fs.String("job", env.jobName(), "name of the job whose checkpoints to list")
	task := -1
	fs.Func("task", "list only task `N` (default: every task)", func(s string) error {
		t, ok := parseTask(s)
		if !ok {
			return errors.New("want a task number >= 0")
		}
		task = int(t)
		return nil
	})
	asJSON := fs.Bool("json", false, "write one JSON object per checkpoint instead of a table")
	if status, stop := parseToolFlags(fs, args); stop {
		return status
	}
	var errs []error
	if err := checkStorageFlags(dir, opts); err != nil {
		errs = append(errs, err)
	}
	errs = append(errs, checkJobFlag(*job))
	if err := errors.Join(errs...); err != nil {
		fmt.Fprintf(env.stderr, "%s: %v\n", name, err)
		return 2
	}

	opts.ReadOnly = true
	st, err := coordinator.OpenStorage(ctx, dir, opts)
	if err != nil {
		fmt.Fprintf(env.stderr, "%s: %v\n", name, err)
		return 1
	}
	tasks, err := listTasks(ctx, st, *job)
	if err != nil {
		fmt.Fprintf(env.stderr, "%s: %v\n", name, err)
		return 1
	}
	if len(tasks) == 0 {
		fmt.Fprintf(env.stderr, "%s: no checkpoints of job %q in %s (nothing in %s)\n", name, *job, st, *job+"/tasks/")
		return 1
	}
	if task >= 0 {
		if !slices.Contains(tasks, int32(task)) {
			fmt.Fprintf(env.stderr, "%s: job %q has no task %d in %s (tasks: %v)\n", name, *job, task, st, tasks)
			return 1
		}
		tasks = []int32{int32(task)}
	}
	listed, err := listCheckpoints(ctx, st, *job, tasks)
	if err != nil {
		fmt.Fprintf(env.stderr, "%s: %v\n", name, err)
		return 1
	}
	if *asJSON {
		err = writeCheckpointsJSON(env.stdout, *job, listed)
	} else {
		err = writeCheckpointsTable(env.stdout, tasks, listed)
	}
	if err != nil {
		fmt.Fprintf(env.stderr, "%s: write: %v\n", name, err)
		return 1
	}
	status := 0
	for _, l := range listed {
		switch l.Status {
		case statusCorrupt, statusUnsupported:
			fmt.Fprintf(env.stderr, "warning: task %d checkpoint %d: %s metadata, which tasks skip: %v\n", l.Task, l.ID, l.Status, l.Err)
		case statusUnreadable:
			fmt.Fprintf(env.stderr, "error: task %d checkpoint %d: %v\n", l.Task, l.ID, l.Err)
			status = 1
		}
	}
	return status
}

// listTasks returns the tasks that have a folder under "<job>/tasks/",
// in order. Folders whose name is not a task number are not tasks.
func listTasks(ctx context.Context, st coordinator.Storage, job string) ([]int32, error) {
	prefix := job + "/tasks/"
	names, err := st.List(ctx, prefix)
	if err != nil {
		return nil, fmt.Errorf("list the tasks of job %q in %s: %w", job, st, err)
	}
	var tasks []int32
	for _, n := range names {
		seg, _, found := strings.Cut(strings.TrimPrefix(n, prefix), "/")
		if !found {
			continue // a file, not a folder
		}
		if t, ok := parseTask(seg); ok && !slices.Contains(tasks, t) {
			tasks = append(tasks, t)
		}
	}
	slices.Sort(tasks)
	return tasks, nil
}

// parseTask parses a task folder's name, in the canonical spelling Sluice
// writes only.
func parseTask(s string) (int32, bool) {
	var t int64
	if s == "" || len(s) > 10 || (len(s) > 1 && s[0] == '0') {
		return 0, false
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, false
		}
		t = t*10 + int64(c-'0')
	}
	if t > 1<<31-1 {
		return 0, false
	}
	return int32(t), true
}

// listLoadParallelism bounds the metadata reads in flight, which matters
// on an object store.
const listLoadParallelism = 8

// listCheckpoints reads the metadata of every complete checkpoint of the
// tasks, in task order and newest first within a task. A checkpoint whose
// metadata vanished since the listing (retention deleted it) is left out.
func listCheckpoints(ctx context.Context, st coordinator.Storage, job string, tasks []int32) ([]listedCheckpoint, error) {
	var listed []listedCheckpoint
	for _, t := range tasks {
		ids, err := coordinator.ListCheckpointIDs(ctx, st, job, t)
		if err != nil {
			return nil, fmt.Errorf("job %q in %s: %w", job, st, err)
		}
		for _, id := range ids {
			listed = append(listed, listedCheckpoint{Task: t, ID: id})
		}
	}
	sem := make(chan struct{}, listLoadParallelism)
	done := make(chan struct{})
	for i := range listed {
		sem <- struct{}{}
		go func(l *listedCheckpoint) {
			defer func() { <-sem; done <- struct{}{} }()
			l.C, l.Err = coordinator.LoadCheckpoint(ctx, st, job, l.Task, l.ID)
			switch {
			case l.Err == nil:
				l.Status = statusComplete
			case errors.Is(l.Err, coordinator.ErrUnsupportedVersion):
				l.Status = statusUnsupported
			case errors.Is(l.Err, coordinator.ErrCorruptMetadata):
				l.Status = statusCorrupt
			default:
				l.Status = statusUnreadable
			}
		}(&listed[i])
	}
	for range listed {
		<-done
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return slices.DeleteFunc(listed, func(l listedCheckpoint) bool {
		return errors.Is(l.Err, coordinator.ErrNotFound)
	}), nil
}

func writeCheckpointsJSON(w io.Writer, job string, listed []listedCheckpoint) error {
	enc := json.NewEncoder(w)
	for _, l := range listed {
		if err := enc.Encode(l.json(job)); err != nil {
			return err
		}
	}
	return nil
}

// writeCheckpointsTable writes the checkpoints as a table, a line saying so
// for a task without any, and the error in place of the offsets for
// metadata that could not be read.
func writeCheckpointsTable(w io.Writer, tasks []int32, listed []listedCheckpoint) error {
	header := []string{"TASK", "CHECKPOINT", "STATUS", "KIND", "CREATED", "FILES", "SIZE", "PENDING", "OFFSETS"}
	var rows [][]string
	for _, t := range tasks {
		n := 0
		for _, l := range listed {
			if l.Task != t {
				continue
			}
			n++
			task, id := strconv.FormatInt(int64(t), 10), strconv.FormatInt(l.ID, 10)
			c := l.C
			if c == nil {
				rows = append(rows, []string{task, id, strings.ToUpper(string(l.Status)), "-", "-", "-", "-", "-", "error: " + l.Err.Error()})
				continue
			}
			rows = append(rows, []string{task, id, string(l.Status), string(c.Kind), c.CreatedAt.UTC().Format(createdFormat),
				strconv.Itoa(len(c.Files)), formatBytes(checkpointSize(c)), strconv.Itoa(len(c.Pending)), formatOffsets(c.Offsets)})
		}
		if n == 0 {
			rows = append(rows, []string{strconv.FormatInt(int64(t), 10), "-", "none", "-", "-", "-", "-", "-", "no complete checkpoint"})
		}
	}
	return writeTable(w, header, rows)
}
