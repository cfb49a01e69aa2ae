package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestCommandErrors checks that bad input gets a clear message and the
// right exit status, without touching any broker for long.
func TestCommandErrors(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		args   []string
		status int
		want   string
	}{
		{"no command", nil, 2, "usage"},
		{"unknown command", []string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{"bad duration", []string{"run", "--interval", "soon"}, 2, "invalid value"},
		{"negative interval", []string{"run", "--interval", "-1s"}, 2, "checkpoint interval must be positive"},
		{"bad delivery", []string{"run", "--delivery", "twice"}, 2, "want exactly-once, at-least-once or none"},
		{"bad start", []string{"run", "--start", "middle"}, 2, "want earliest or latest"},
		{"bad state", []string{"run", "--state", "redis"}, 2, `--state "redis"`},
		{"stray argument", []string{"run", "extra"}, 2, "unexpected arguments"},
		{"unwritable checkpoint dir", []string{"run", "--checkpoint-dir", filepath.Join(file, "chk")}, 1, "is not writable"},
		{"unreachable broker", []string{"run", "--brokers", "127.0.0.1:1", "--connect-timeout", "1s", "--checkpoint-dir", t.TempDir()}, 1, "cannot reach Kafka brokers 127.0.0.1:1 within 1s"},
		{"bad demo flag", []string{"demo", "--rate", "0"}, 2, "must be positive"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			status := dispatch(c.args, &stdout, &stderr)
			if status != c.status || !strings.Contains(stderr.String(), c.want) {
				t.Fatalf("status %d, stderr %q; want status %d and %q", status, stderr.String(), c.status, c.want)
			}
		})
	}
}
