package service

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/sluice-stream/sluice/coordinator"
	"github.com/sluice-stream/sluice/state"
)

func init() {
	registerTool(tool{name: "savepoint", summary: "take a savepoint of a running job (--stop: then stop it) and print its location", run: savepointTrigger})
	registerTool(tool{name: "savepoint dispose", summary: "delete the savepoint at LOCATION", run: savepointDispose})
	registerTool(tool{name: "savepoints list", summary: "list the savepoints in a job's default savepoint folder", run: savepointsList})
	registerTool(tool{name: "state dump", summary: "write the keyed state of a savepoint or job checkpoint folder as JSON lines", run: stateDump})
}

// checkJobFlag checks a --job value.
func checkJobFlag(job string) error {
	switch {
	case job == "":
		return errors.New("--job is required")
	case strings.Contains(job, "/") || coordinator.ValidateName(job) != nil:
		return fmt.Errorf("--job %q is not a job name", job)
	}
	return nil
}

// savepointTrigger is `savepoint`: it sends a savepoint request through the
// job's control topic, shows the parts arriving (repeating the request for
// tasks that moved to an instance started after it), creates the
// savepoint's _metadata once every task wrote its part, and prints the
// savepoint's location. With --stop it then waits for the job's instances
// to leave the group.
func savepointTrigger(ctx context.Context, args []string, env toolEnv) int {
	const name = "savepoint"
	c := DefaultConfig()
	fs := newToolFlags(name, "--job NAME [--stop] [--target LOCATION] [flags]", env)
	registerStorageFlags(fs, &c.CheckpointDir, &c.S3)
	fs.Func("brokers", "comma-separated Kafka seed brokers (default localhost:9092)", func(s string) error {
		c.Brokers = strings.Split(s, ",")
		return nil
	})
	job := fs.String("job", env.jobName(), "name of the job")
	stop := fs.Bool("stop", false, "stop the job after the savepoint (its transactions are committed first)")
	target := fs.String("target", "", "folder (location) to write the savepoint into (default: <checkpoint-dir>/<job>/savepoints)")
	timeout := fs.Duration("timeout", 10*time.Minute, "how long to wait for every task")
	if status, stopNow := parseToolFlags(fs, args); stopNow {
		return status
	}
	if err := errors.Join(checkStorageFlags(c.CheckpointDir, c.S3), checkJobFlag(*job)); err != nil {
		fmt.Fprintf(env.stderr, "%s: %v\n", name, err)
		return 2
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	fail := func(err error) int {
		fmt.Fprintf(env.stderr, "%s: %v\n", name, err)
		return 1
	}

	id := coordinator.NewSavepointID(time.Now())
	base := *target
	if base == "" {
		base = coordinator.JoinLocation(c.CheckpointDir, coordinator.SavepointsPrefix(*job))
	}
	loc := coordinator.JoinLocation(base, id)
	st, err := coordinator.OpenStorage(ctx, loc, c.S3)
	if err != nil {
		return fail(err)
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(c.Brokers...), kgo.DefaultProduceTopic(ControlTopic(*job)))
	if err != nil {
		return fail(err)
	}
	defer cl.Close()
	if err := ensureControlTopic(ctx, kadm.NewClient(cl), *job); err != nil {
		return fail(err)
	}
	req := coordinator.SavepointRequest{Job: *job, ID: id, Location: loc, Stop: *stop}
	payload, err := json.Marshal(req)
	if err != nil {
		return fail(err)
	}
	send := func() error {
		return cl.ProduceSync(ctx, &kgo.Record{Key: []byte(id), Value: payload}).FirstErr()
	}
	if err := send(); err != nil {
		return fail(fmt.Errorf("send request to %s: %w", ControlTopic(*job), err))
	}
	fmt.Fprintf(env.stderr, "savepoint %s of job %s requested (stop: %v); waiting for every task to write its part to %s\n", id, *job, *stop, loc)

	var partitions int32
	shown, lastSend, started, warned := -1, time.Now(), time.Now(), false
	for {
		parts, err := coordinator.ReadSavepointParts(ctx, st)
		if err != nil {
			fmt.Fprintf(env.stderr, "  reading parts: %v (retrying)\n", err)
		}
		for _, p := range parts {
			partitions = max(partitions, p.Partitions)
		}
		if len(parts) != shown && partitions > 0 {
			shown = len(parts)
			fmt.Fprintf(env.stderr, "  %d/%d tasks written\n", shown, partitions)
		}
		if partitions > 0 && len(parts) >= int(partitions) {
			break
		}
		if !warned && shown < 0 && time.Since(started) > 30*time.Second {
			fmt.Fprintf(env.stderr, "  no task has answered after 30s: is job %s running? (waiting up to --timeout %s)\n", *job, *timeout)
			warned = true
		}
		if time.Since(lastSend) > 5*time.Second {
			// Tasks that moved to an instance started after the request
			// have not seen it; the others ignore a repeat.
			if err := send(); err != nil {
				fmt.Fprintf(env.stderr, "  repeating the request: %v\n", err)
			}
			lastSend = time.Now()
		}
		select {
		case <-ctx.Done():
			return fail(fmt.Errorf("savepoint %s incomplete after %s: %d of %d tasks wrote their part (is the job running?); delete it with `savepoint dispose %s`", id, *timeout, max(shown, 0), partitions, loc))
		case <-time.After(200 * time.Millisecond):
		}
	}
	sp, err := coordinator.CompleteSavepoint(ctx, st, coordinator.Savepoint{Job: *job, ID: id, Partitions: partitions, Stopped: *stop})
	if err != nil {
		return fail(err)
	}
	var size int64
	for _, p := range sp.Parts {
		size += p.Bytes
	}
	fmt.Fprintf(env.stderr, "savepoint %s complete: %d tasks, %s\n", id, len(sp.Parts), formatBytes(size))
	if *stop {
		fmt.Fprintf(env.stderr, "waiting for the instances of %s to stop\n", *job)
		if err := waitGroupEmpty(ctx, kadm.NewClient(cl), *job); err != nil {
			return fail(fmt.Errorf("savepoint %s is complete, but: %w", id, err))
		}
		fmt.Fprintf(env.stderr, "job %s stopped\n", *job)
	}
	fmt.Fprintln(env.stdout, loc)
	return 0
}

// waitGroupEmpty waits until the job's consumer group has no members.
func waitGroupEmpty(ctx context.Context, adm *kadm.Client, group string) error {
	for {
		groups, err := adm.DescribeGroups(ctx, group)
		if err == nil {
			if g, ok := groups[group]; ok && g.Err == nil && len(g.Members) == 0 {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("instances of %s still in the group: %w", group, ctx.Err())
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// savepointDispose is `savepoint dispose LOCATION`.
func savepointDispose(ctx context.Context, args []string, env toolEnv) int {
	const name = "savepoint dispose"
	var opts coordinator.StorageOptions
	fs := newToolFlags(name, "[flags] LOCATION", env)
	registerS3Flags(fs, &opts)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() != 1 {
		fmt.Fprintf(env.stderr, "%s: want exactly one savepoint location, got %q\n", name, fs.Args())
		return 2
	}
	loc := fs.Arg(0)
	if err := checkStorageFlags(loc, opts); err != nil {
		fmt.Fprintf(env.stderr, "%s: %v\n", name, err)
		return 2
	}
	st, err := coordinator.OpenStorage(ctx, loc, opts)
	if err != nil {
		fmt.Fprintf(env.stderr, "%s: %v\n", name, err)
		return 1
	}
	n, err := coordinator.DisposeSavepoint(ctx, st)
	if err != nil {
		fmt.Fprintf(env.stderr, "%s: %v\n", name, err)
		return 1
	}
	fmt.Fprintf(env.stdout, "deleted savepoint %s (%d objects)\n", loc, n)
	return 0
}

// savepointsList is `savepoints list`.
func savepointsList(ctx context.Context, args []string, env toolEnv) int {
	const name = "savepoints list"
	dir := DefaultConfig().CheckpointDir
	var opts coordinator.StorageOptions
	fs := newToolFlags(name, "--checkpoint-dir LOCATION --job NAME [flags]", env)
	registerStorageFlags(fs, &dir, &opts)
	job := fs.String("job", env.jobName(), "name of the job whose savepoints to list")
	if status, stop := parseToolFlags(fs, args); stop {
		return status
	}
	if err := errors.Join(checkStorageFlags(dir, opts), checkJobFlag(*job)); err != nil {
		fmt.Fprintf(env.stderr, "%s: %v\n", name, err)
		return 2
	}
	opts.ReadOnly = true
	st, err := coordinator.OpenStorage(ctx, dir, opts)
	if err != nil {
		fmt.Fprintf(env.stderr, "%s: %v\n", name, err)
		return 1
	}
	infos, err := coordinator.ListSavepoints(ctx, st, *job)
	if err != nil {
		fmt.Fprintf(env.stderr, "%s: %v\n", name, err)
		return 1
	}
	rows := make([][]string, 0, len(infos))
	for _, i := range infos {
		loc := coordinator.JoinLocation(dir, coordinator.SavepointsPrefix(*job), i.ID)
		switch {
		case i.Err != nil:
			rows = append(rows, []string{i.ID, "UNREADABLE", "-", "-", "-", "-", loc + ": " + i.Err.Error()})
		case i.Savepoint == nil:
			rows = append(rows, []string{i.ID, "INCOMPLETE", "-", "-", "-", "-", loc})
		default:
			sp := i.Savepoint
			rows = append(rows, []string{i.ID, "complete", sp.CreatedAt.UTC().Format(createdFormat), strconv.Itoa(int(sp.Partitions)),
				strconv.FormatBool(sp.Stopped), formatBytes(i.Bytes), loc})
		}
	}
	if len(rows) == 0 {
		fmt.Fprintf(env.stderr, "no savepoints of job %s in %s\n", *job, coordinator.JoinLocation(dir, coordinator.SavepointsPrefix(*job)))
		return 0
	}
	if err := writeTable(env.stdout, []string{"SAVEPOINT", "STATUS", "CREATED", "TASKS", "STOPPED", "SIZE", "LOCATION"}, rows); err != nil {
		fmt.Fprintf(env.stderr, "%s: %v\n", name, err)
		return 1
	}
	return 0
}

// stateEntryJSON is one line of `state dump`.
type stateEntryJSON struct {
	Task     int32           `json:"task"`
	Operator string          `json:"operator"`
	State    string          `json:"state"`
	Key      any             `json:"key"`
	MapKey   any             `json:"map_key,omitempty"`
	Value    json.RawMessage `json:"value"`
}

// stateDump is `state dump --from LOCATION`: a small State Processor API.
// Keys are shown as text when they are UTF-8, else as {"base64": ...};
// values are decoded with --value (the codec the operator's state uses).
func stateDump(ctx context.Context, args []string, env toolEnv) int {
	const name = "state dump"
	var opts coordinator.StorageOptions
	from := ""
	fs := newToolFlags(name, "--from LOCATION [--operator UID] [--value CODEC] [flags]", env)
	registerS3Flags(fs, &opts)
	fs.StringVar(&from, "from", "", "a savepoint, or a job checkpoint folder (<checkpoint-dir>/<job>)")
	operator := fs.String("operator", "", "dump only the state of the operator with this uid")
	valueCodec := fs.String("value", "bytes", "how values are encoded: bytes (base64), string, int64 (state.Int64) or json")
	backend := fs.String("state", "pebble", "state backend that wrote a checkpoint folder: pebble or memory")
	if status, stop := parseToolFlags(fs, args); stop {
		return status
	}
	decode, err := valueDecoder(*valueCodec)
	if err == nil && from == "" {
		err = errors.New("--from is required")
	}
	if err == nil {
		err = checkStorageFlags(from, opts)
	}
	if err == nil && *backend != "pebble" && *backend != "memory" {
		err = fmt.Errorf("--state %q: want pebble or memory", *backend)
	}
	if err != nil {
		fmt.Fprintf(env.stderr, "%s: %v\n", name, err)
		return 2
	}
	fail := func(err error) int {
		fmt.Fprintf(env.stderr, "%s: %v\n", name, err)
		return 1
	}
	opts.ReadOnly = true
	st, err := coordinator.OpenStorage(ctx, from, opts)
	if err != nil {
		return fail(err)
	}
	var factory state.Factory = state.NewMemoryFactory()
	if *backend == "pebble" {
		pf := state.NewPebbleFactory(8 << 20)
		defer pf.Close()
		factory = pf
	}
	tmp, err := os.MkdirTemp("", "sluice-state-dump-")
	if err != nil {
		return fail(err)
	}
	defer os.RemoveAll(tmp)
	snap, err := coordinator.OpenSnapshot(ctx, st, factory, tmp)
	if err != nil {
		return fail(err)
	}
	fmt.Fprintf(env.stderr, "%s of job %s, %d tasks, at %s\n", snap.Kind, snap.Job, snap.Partitions, from)
	enc := json.NewEncoder(env.stdout)
	var n int64
	for task := range snap.Partitions {
		err := snap.Scan(ctx, task, func(k, v []byte) error {
			op, stateName, key, sub, err := state.ParseStateKey(k)
			if err != nil {
				return err
			}
			if *operator != "" && op != *operator {
				return nil
			}
			value, err := decode(v)
			if err != nil {
				return fmt.Errorf("operator %s state %s key %q: %w", op, stateName, key, err)
			}
			e := stateEntryJSON{Task: task, Operator: op, State: stateName, Key: bytesJSON(key), Value: value}
			if len(sub) > 0 {
				e.MapKey = bytesJSON(sub)
			}
			n++
			return enc.Encode(e)
		})
		if err != nil {
			return fail(fmt.Errorf("task %d: %w", task, err))
		}
	}
	fmt.Fprintf(env.stderr, "%d entries\n", n)
	return 0
}

// bytesJSON shows bytes as a string if they are UTF-8 text, else as
// {"base64": ...}.
func bytesJSON(b []byte) any {
	if utf8.Valid(b) {
		return string(b)
	}
	return map[string]string{"base64": base64.StdEncoding.EncodeToString(b)}
}

// valueDecoder returns the decoder of --value.
func valueDecoder(codec string) (func([]byte) (json.RawMessage, error), error) {
	marshal := func(v any, err error) (json.RawMessage, error) {
		if err != nil {
			return nil, err
		}
		return json.Marshal(v)
	}
	switch codec {
	case "bytes":
		return func(b []byte) (json.RawMessage, error) { return json.Marshal(b) }, nil
	case "string":
		return func(b []byte) (json.RawMessage, error) { return marshal(state.String.Decode(b)) }, nil
	case "int64":
		return func(b []byte) (json.RawMessage, error) { return marshal(state.Int64.Decode(b)) }, nil
	case "json":
		return func(b []byte) (json.RawMessage, error) {
			if !json.Valid(b) {
				return nil, errors.New("value is not JSON")
			}
			return json.RawMessage(b), nil
		}, nil
	}
	return nil, fmt.Errorf("--value %q: want bytes, string, int64 or json", codec)
}
