package coordinator

import (
	"sync"
	"time"
)

// CheckpointRecord is one checkpoint of a task as monitoring sees it, like a
// row of Flink's checkpoint history.
type CheckpointRecord struct {
	Task int32 `json:"task"`
	ID   int64 `json:"id"`
	// Status is "completed" or "failed".
	Status  string    `json:"status"`
	Barrier time.Time `json:"barrier"`
	// SyncPause is how long the barrier held up record processing.
	SyncPause time.Duration `json:"sync_pause_ns"`
	// Duration is from the barrier to completion (or failure).
	Duration time.Duration `json:"duration_ns"`
	// FullBytes is the size of the whole state snapshot; UploadedBytes what
	// this checkpoint uploaded (incremental).
	FullBytes     int64 `json:"full_bytes"`
	UploadedBytes int64 `json:"uploaded_bytes"`
	// CommitLatency is how long committing its transactions took.
	CommitLatency time.Duration    `json:"commit_latency_ns"`
	Offsets       map[string]int64 `json:"offsets"`
	Error         string           `json:"error,omitempty"`
}

// historySize is how many checkpoint records a task keeps.
const historySize = 32

// history is a task's newest checkpoint records.
type history struct {
	mu      sync.Mutex
	records []CheckpointRecord
}

func (h *history) add(r CheckpointRecord) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.records) == historySize {
		h.records = append(h.records[:0], h.records[1:]...)
	}
	h.records = append(h.records, r)
}

// History returns the task's newest checkpoint records, oldest first.
func (s *TaskStats) History() []CheckpointRecord {
	s.history.mu.Lock()
	defer s.history.mu.Unlock()
	return append([]CheckpointRecord(nil), s.history.records...)
}
