// Package state owns Sluice's keyed operator state: backends (Pebble by
// default, in-memory for tests), the buffered per-task Store that makes a
// barrier O(1), typed keyed-state handles with codecs, and a task's snapshot
// and restore.
//
// Writes since the last barrier live in an in-memory write buffer. A barrier
// seals that buffer (no I/O); the checkpoint's asynchronous part applies the
// sealed buffer to the backend as one batch and takes a backend checkpoint,
// so the backend only ever holds states at barrier boundaries. Reads see the
// live buffer, then sealed buffers (newest first), then the backend.
//
// Snapshot and restore: Store.Persist returns the files of a backend
// checkpoint; Factory.Shareable says which of them are immutable and may be
// uploaded once and referenced by later checkpoints (incremental
// checkpoints); Factory.Open on a directory holding copies of those files
// restores the task's state.
//
// Storage keys (StateKey) are length-prefixed (operator uid, state name,
// record key) followed by the MapState map key, so that all entries of one
// record key are one contiguous, prefix-scannable range and a key can be
// split back into its parts (ParseStateKey) to re-partition state.
package state
