package coordinator

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
)

// Checkpoint metadata is stored in a versioned envelope whose checksum
// covers the exact bytes of the body:
//
//	{"format":"sluice-checkpoint","version":1,"sha256":"<hex>","body":{...Checkpoint...}}
//
// Within a version, fields may be added only if an older reader may safely
// ignore them; any other change needs a new version, which older builds
// refuse with ErrUnsupportedVersion instead of misreading.
const (
	metadataFormat  = "sluice-checkpoint"
	metadataVersion = 1
)

// ErrCorruptMetadata is returned for checkpoint metadata that cannot be
// trusted: not JSON, truncated, another format, a checksum mismatch, or
// fields that make no sense. Such a checkpoint is skipped.
var ErrCorruptMetadata = errors.New("corrupt checkpoint metadata")

// ErrUnsupportedVersion is returned for checkpoint metadata of a version
// this build cannot read, typically written by a newer Sluice.
var ErrUnsupportedVersion = errors.New("unsupported checkpoint metadata version")

type metadataEnvelope struct {
	Format  string          `json:"format"`
	Version int             `json:"version"`
	SHA256  string          `json:"sha256"`
	Body    json.RawMessage `json:"body"`
}

// EncodeCheckpoint serializes c in the current metadata version. It refuses
// a checkpoint that DecodeCheckpoint would reject.
func EncodeCheckpoint(c *Checkpoint) ([]byte, error) {
	if c == nil {
		return nil, errors.New("encode checkpoint: nil")
	}
	if err := validateCheckpoint(c); err != nil {
		return nil, fmt.Errorf("encode checkpoint: %w", err)
	}
	b, err := encodeEnvelope(metadataFormat, metadataVersion, c)
	if err != nil {
		return nil, fmt.Errorf("encode checkpoint %d of task %d: %w", c.ID, c.Task, err)
	}
	return b, nil
}

// encodeEnvelope serializes v as the body of a versioned, checksummed
// envelope (the checkpoint and savepoint metadata formats).
func encodeEnvelope(format string, version int, v any) ([]byte, error) {
	body, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(body)
	// The envelope is assembled by hand so the stored body is byte for byte
	// the one hashed (marshalling a RawMessage may reformat it).
	var b bytes.Buffer
	b.WriteString(`{"format":"` + format + `","version":`)
	fmt.Fprint(&b, version)
	b.WriteString(`,"sha256":"` + hex.EncodeToString(sum[:]) + `","body":`)
	b.Write(body)
	b.WriteString("}\n")
	return b.Bytes(), nil
}

// DecodeCheckpoint parses checkpoint metadata, verifying format, version,
// checksum and fields. Errors wrap ErrCorruptMetadata or
// ErrUnsupportedVersion.
func DecodeCheckpoint(b []byte) (*Checkpoint, error) {
	var c Checkpoint
	if err := decodeEnvelope(b, metadataFormat, metadataVersion, &c); err != nil {
		return nil, err
	}
	if err := validateCheckpoint(&c); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorruptMetadata, err)
	}
	return &c, nil
}

// validateCheckpoint checks what the rest of the coordinator relies on,
// including that file objects stay inside the task's folder: retention and
// restore join them to the task prefix.
func validateCheckpoint(c *Checkpoint) error {
	switch {
	case c.Job == "":
		return errors.New("empty job")
	case c.ID <= 0:
		return fmt.Errorf("checkpoint id %d, want > 0", c.ID)
	case c.Task < 0:
		return fmt.Errorf("task %d, want >= 0", c.Task)
	}
	for _, f := range c.Files {
		if err := ValidateName(f.Object); err != nil {
			return fmt.Errorf("file %q: %w", f.Name, err)
		}
	}
	return nil
}

// decodeEnvelope checks an envelope written by encodeEnvelope (format,
// version, checksum) and unmarshals its body into v. Errors wrap
// ErrCorruptMetadata or ErrUnsupportedVersion.
func decodeEnvelope(b []byte, format string, version int, v any) error {
	if len(bytes.TrimSpace(b)) == 0 {
		return fmt.Errorf("%w: empty", ErrCorruptMetadata)
	}
	var env metadataEnvelope
	if err := json.Unmarshal(b, &env); err != nil {
		return fmt.Errorf("%w: %v", ErrCorruptMetadata, err)
	}
	if env.Format != format {
		return fmt.Errorf("%w: format %q, want %q", ErrCorruptMetadata, env.Format, format)
	}
	// The version decides how the rest is read, so it is checked before
	// the checksum: a newer envelope may hash differently.
	switch {
	case env.Version > version:
		return fmt.Errorf("%w: version %d (this build reads version %d; written by a newer Sluice?)",
			ErrUnsupportedVersion, env.Version, version)
	case env.Version < 1:
		return fmt.Errorf("%w: missing or invalid version %d", ErrCorruptMetadata, env.Version)
	}
	if len(env.Body) == 0 {
		return fmt.Errorf("%w: no body", ErrCorruptMetadata)
	}
	sum := sha256.Sum256(env.Body)
	if got := hex.EncodeToString(sum[:]); got != env.SHA256 {
		return fmt.Errorf("%w: checksum mismatch (stored sha256 %q, body has %s)",
			ErrCorruptMetadata, env.SHA256, got)
	}
	if err := json.Unmarshal(env.Body, v); err != nil {
		return fmt.Errorf("%w: body: %v", ErrCorruptMetadata, err)
	}
	return nil
}
