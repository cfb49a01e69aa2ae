package sink

import (
	"bytes"
	"context"
	"testing"

	"github.com/twmb/franz-go/pkg/kgo"
)

func TestStdout(t *testing.T) {
	var buf bytes.Buffer
	s := NewStdout(&buf)
	w, err := s.NewWriter(context.Background(), 0)
	if err != nil {
		t.Fatal(err)
	}
	w.Write(&kgo.Record{Topic: "t", Key: []byte("k"), Value: []byte("v")})
	w.Write(&kgo.Record{Topic: "t", Value: []byte("nokey")})
	pc, err := w.PreCommit(context.Background(), 1)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := pc.Wait(context.Background()); c != nil || err != nil {
		t.Fatalf("wait: %v %v", c, err)
	}
	if got, want := buf.String(), "t\tk\tv\nt\t\tnokey\n"; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
	if _, err := s.Recover(context.Background(), 0, []Committable{{CheckpointID: 1}}); err == nil {
		t.Error("stdout recovered a Kafka committable")
	}
	w.Close()
	s.Close()
}
