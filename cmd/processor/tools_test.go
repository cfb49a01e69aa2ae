package main

import (
	"bytes"
	"strings"
	"testing"
)

// TestToolCommands checks that the tool commands reach service.ToolCommand.
func TestToolCommands(t *testing.T) {
	cases := []struct {
		name   string
		args   []string
		status int
		stdout string
		stderr string
	}{
		{"group usage", []string{"checkpoints"}, 2, "", "checkpoints list"},
		{"bad scheme", []string{"checkpoints", "list", "--job", "counts", "--checkpoint-dir", "gs://bucket/x"}, 2, "",
			`invalid storage location "gs://bucket/x": unknown scheme "gs"`},
		{"empty directory", []string{"checkpoints", "list", "--job", "counts", "--checkpoint-dir", t.TempDir()}, 1, "",
			`no checkpoints of job "counts"`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			status := dispatch(c.args, &stdout, &stderr)
			if status != c.status || !strings.Contains(stdout.String(), c.stdout) || !strings.Contains(stderr.String(), c.stderr) {
				t.Fatalf("status %d, stdout %q, stderr %q; want status %d, %q and %q", status, stdout.String(), stderr.String(), c.status, c.stdout, c.stderr)
			}
		})
	}
}
