package coordinator

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/sluice-stream/sluice/sink"
)

func metaTestCheckpoint(job string, task int32, id int64) *Checkpoint {
	return &Checkpoint{
		Job: job, Task: task, ID: id,
		Kind:      KindCheckpoint,
		Owner:     "host-a/42",
		CreatedAt: time.Date(2026, 3, 4, 5, 6, 7, 8, time.UTC),
		Offsets:   map[string]int64{"in": 100, "other<&>": 7},
		Files: []FileRef{
			{Name: "000012.sst", Object: "shared/host-a-000012.sst", Size: 1234},
			{Name: "MANIFEST-000001", Object: checkpointDir(id) + "MANIFEST-000001", Size: 99},
		},
		Pending: []PendingTxn{{
			CheckpointID: id,
			Offsets:      map[string]int64{"in": 100},
			Committable: sink.Committable{
				CheckpointID: id, TransactionalID: "sluice-" + job + "-0-1",
				ProducerID: 5, Epoch: 3,
			},
		}},
	}
}

func mustEncodeCheckpoint(t *testing.T, c *Checkpoint) []byte {
	t.Helper()
	b, err := EncodeCheckpoint(c)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestMetadataRoundTrip(t *testing.T) {
	c := metaTestCheckpoint("counts", 3, 12)
	b := mustEncodeCheckpoint(t, c)
	got, err := DecodeCheckpoint(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, c) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", got, c)
	}
	if !bytes.HasPrefix(b, []byte(`{"format":"sluice-checkpoint","version":1,"sha256":"`)) {
		t.Fatalf("envelope: %s", b)
	}
}

func TestMetadataChecksum(t *testing.T) {
	b := mustEncodeCheckpoint(t, metaTestCheckpoint("counts", 3, 12))
	i := bytes.Index(b, []byte(`"in":100`))
	if i < 0 {
		t.Fatalf("offset not found in %s", b)
	}
	flipped := bytes.Clone(b)
	flipped[i+len(`"in":1`)] = '9' // 100 -> 190: still valid JSON
	_, err := DecodeCheckpoint(flipped)
	if !errors.Is(err, ErrCorruptMetadata) || !strings.Contains(err.Error(), "checksum mismatch") {
		t.Fatalf("got %v, want a checksum mismatch", err)
	}
}

func TestMetadataCorrupt(t *testing.T) {
	good := mustEncodeCheckpoint(t, metaTestCheckpoint("counts", 3, 12))
	envelope := func(mutate func(map[string]any)) []byte {
		var m map[string]any
		if err := json.Unmarshal(good, &m); err != nil {
			t.Fatal(err)
		}
		mutate(m)
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	// A valid checksum over an invalid body.
	withBody := func(body string) []byte { return metaTestSeal(t, []byte(body)) }
	cases := map[string][]byte{
		"empty":         nil,
		"whitespace":    []byte(" \n"),
		"not json":      []byte("hello"),
		"wrong format":  envelope(func(m map[string]any) { m["format"] = "flink-checkpoint" }),
		"no version":    envelope(func(m map[string]any) { delete(m, "version") }),
		"no body":       envelope(func(m map[string]any) { delete(m, "body") }),
		"empty job":     withBody(`{"job":"","task":0,"id":1}`),
		"zero id":       withBody(`{"job":"j","task":0,"id":0}`),
		"negative task": withBody(`{"job":"j","task":-1,"id":1}`),
		"escaping file": withBody(`{"job":"j","task":0,"id":1,"files":[{"name":"x","object":"../../etc/passwd"}]}`),
		"body not obj":  withBody(`[1,2]`),
	}
	for n := 1; n < len(good); n += 7 {
		cases[fmt.Sprintf("truncated to %d bytes", n)] = good[:n]
	}
	for name, b := range cases {
		c, err := DecodeCheckpoint(b)
		if !errors.Is(err, ErrCorruptMetadata) {
			t.Errorf("%s: got %+v, %v; want ErrCorruptMetadata", name, c, err)
		}
	}
}

// metaTestSeal wraps body in a version 1 envelope with a correct checksum.
func metaTestSeal(t *testing.T, body []byte) []byte {
	t.Helper()
	var b bytes.Buffer
	b.WriteString(`{"format":"sluice-checkpoint","version":1,"sha256":"`)
	sum := sha256.Sum256(body)
	b.WriteString(hex.EncodeToString(sum[:]))
	b.WriteString(`","body":`)
	b.Write(body)
	b.WriteString("}")
	return b.Bytes()
}

func TestMetadataUnsupportedVersion(t *testing.T) {
	b := mustEncodeCheckpoint(t, metaTestCheckpoint("counts", 3, 12))
	b = bytes.Replace(b, []byte(`"version":1`), []byte(`"version":2`), 1)
	_, err := DecodeCheckpoint(b)
	if !errors.Is(err, ErrUnsupportedVersion) || errors.Is(err, ErrCorruptMetadata) ||
		!strings.Contains(err.Error(), "version 2") {
		t.Fatalf("got %v, want ErrUnsupportedVersion naming version 2", err)
	}
}

func TestMetadataEncodeRejectsInvalid(t *testing.T) {
	for _, c := range []*Checkpoint{nil, {Task: 0, ID: 1}, {Job: "j", ID: 0}, {Job: "j", Task: -1, ID: 1}} {
		if _, err := EncodeCheckpoint(c); err == nil {
			t.Errorf("EncodeCheckpoint(%+v) succeeded", c)
		}
	}
}

func TestMetadataLoadCheckpoint(t *testing.T) {
	ctx := context.Background()
	st := NewMemStorage()
	c := metaTestCheckpoint("counts", 3, 12)
	if err := st.Create(ctx, MetadataName("counts", 3, 12), mustEncodeCheckpoint(t, c)); err != nil {
		t.Fatal(err)
	}
	got, err := LoadCheckpoint(ctx, st, "counts", 3, 12)
	if err != nil || !reflect.DeepEqual(got, c) {
		t.Fatalf("LoadCheckpoint = %+v, %v", got, err)
	}

	// The metadata of checkpoint 12 copied where 13 belongs, or to another
	// task or job.
	for _, path := range []struct {
		job  string
		task int32
		id   int64
	}{{"counts", 3, 13}, {"counts", 4, 12}, {"other", 3, 12}} {
		if err := st.Put(ctx, MetadataName(path.job, path.task, path.id), bytes.NewReader(mustEncodeCheckpoint(t, c))); err != nil {
			t.Fatal(err)
		}
		_, err := LoadCheckpoint(ctx, st, path.job, path.task, path.id)
		if !errors.Is(err, ErrCorruptMetadata) {
			t.Errorf("%+v: got %v, want ErrCorruptMetadata", path, err)
		}
	}

	_, err = LoadCheckpoint(ctx, st, "counts", 3, 99)
	if !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "checkpoint 99 of task 3") {
		t.Fatalf("missing: %v", err)
	}
	if err := st.Put(ctx, MetadataName("counts", 3, 14), strings.NewReader(`{"format":"sluice-checkpoint","ver`)); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadCheckpoint(ctx, st, "counts", 3, 14); !errors.Is(err, ErrCorruptMetadata) {
		t.Fatalf("truncated: %v", err)
	}
}

// FuzzMetadataDecode checks that no input makes DecodeCheckpoint panic and
// that whatever it accepts survives a round trip.
func FuzzMetadataDecode(f *testing.F) {
	good, err := EncodeCheckpoint(metaTestCheckpoint("counts", 3, 12))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Add([]byte(`{"format":"sluice-checkpoint","version":1,"sha256":"","body":null}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := DecodeCheckpoint(b)
		if err != nil {
			if !errors.Is(err, ErrCorruptMetadata) && !errors.Is(err, ErrUnsupportedVersion) {
				t.Fatalf("unclassified error %v", err)
			}
			return
		}
		again, err := DecodeCheckpoint(mustEncodeCheckpoint(t, c))
		if err != nil || !reflect.DeepEqual(again, c) {
			t.Fatalf("round trip of accepted input: %+v, %v", again, err)
		}
	})
}
