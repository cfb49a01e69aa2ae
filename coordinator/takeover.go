package coordinator

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"time"

	"github.com/sluice-stream/sluice/operators"
	"github.com/sluice-stream/sluice/sink"
)

// maxClaimAttempts bounds how often a takeover retries when other owners keep
// completing the checkpoint it tries to claim.
const maxClaimAttempts = 10

// takeover runs DESIGN.md's takeover steps and leaves the task ready to run:
//  1. find the newest complete checkpoint m;
//  2. claim the task by creating chk-(m+1) (same state and offsets, m's
//     pending transactions still listed); a lost race goes back to 1;
//  3. commit the pending transactions, each outcome decided by its marker;
//     a lost one rolls the task back to an older state (rollback);
//  4. with run --from, import the state of a savepoint once (importState);
//  5. fence the task's transactional ids (the sink's NewWriter);
//  6. restore state, seek, run.
//
// It returns the checkpoint the task now runs from, followed by the other
// readable checkpoints, newest first (the ones retention starts from).
func (t *Task) takeover(ctx context.Context) ([]*Checkpoint, error) {
	claim, known, err := t.claim(ctx)
	if err != nil {
		return nil, err
	}
	if err := t.step(StepClaimed, claim.ID); err != nil {
		return nil, err
	}
	from, err := t.recoverPending(ctx, claim, known)
	if err != nil {
		return nil, err
	}
	if from.ID != claim.ID {
		known = append([]*Checkpoint{claim}, known...)
	}
	if imp := t.cfg.Import; imp != nil && from.RestoredFrom != imp.From {
		imported, err := t.importState(ctx, from)
		if err != nil {
			return nil, err
		}
		known = append([]*Checkpoint{from}, known...)
		from = imported
	}
	t.restoredFrom = from.RestoredFrom
	w, err := t.cfg.Sink.NewWriter(ctx, t.cfg.Task)
	if err != nil {
		return nil, fmt.Errorf("fence transactional ids of task %d: %w", t.cfg.Task, err)
	}
	t.writer = w
	if err := t.step(StepFenced, from.ID); err != nil {
		return nil, err
	}
	if err := t.cfg.Input.CheckAvailable(ctx, t.cfg.Task, from.Offsets); err != nil {
		return nil, fmt.Errorf("restore checkpoint %d of task %d: %w", from.ID, t.cfg.Task, err)
	}
	if err := t.restoreState(ctx, from); err != nil {
		return nil, err
	}
	t.out = suppressWriter{Writer: w, out: &t.st.RecordsOut}
	t.chain, err = t.cfg.Job.Build(operators.TaskEnv{Task: t.cfg.Task, Store: t.store, Out: &t.out, Log: t.log})
	if err != nil {
		return nil, fmt.Errorf("build operators of task %d: %w", t.cfg.Task, err)
	}
	t.position = maps.Clone(from.Offsets)
	if !offsetsLE(from.CommittedOffsets, from.Offsets) {
		t.frontier = maps.Clone(from.CommittedOffsets)
	}
	t.nextID = from.ID + 1
	t.txnOpened = time.Now()
	t.feed, err = t.cfg.Input.Open(ctx, t.cfg.Task, from.Offsets)
	if err != nil {
		return nil, fmt.Errorf("seek task %d: %w", t.cfg.Task, err)
	}
	t.st.Restored.Store(from.ID)
	t.log.Info("task restored", "checkpoint", from.ID, "kind", from.Kind, "offsets", from.Offsets, "files", len(from.Files), t.restored.attr())
	return append([]*Checkpoint{from}, known...), nil
}

// claim creates the claim checkpoint. It also returns every readable
// complete checkpoint, newest first, for a rollback.
func (t *Task) claim(ctx context.Context) (*Checkpoint, []*Checkpoint, error) {
	for attempt := 1; ; attempt++ {
		ids, err := ListCheckpointIDs(ctx, t.cfg.Storage, t.job, t.cfg.Task)
		if err != nil {
			return nil, nil, fmt.Errorf("takeover of task %d: %w", t.cfg.Task, err)
		}
		var known []*Checkpoint
		for _, id := range ids {
			c, err := LoadCheckpoint(ctx, t.cfg.Storage, t.job, t.cfg.Task, id)
			if errors.Is(err, ErrCorruptMetadata) || errors.Is(err, ErrUnsupportedVersion) {
				t.log.Error("CHECKPOINT UNREADABLE, skipping it and using the previous retained one", "checkpoint", id, "err", err)
				continue
			}
			if err != nil {
				return nil, nil, fmt.Errorf("takeover of task %d: %w", t.cfg.Task, err)
			}
			known = append(known, c)
		}
		var c Checkpoint
		switch {
		case len(known) > 0:
			c = *known[0]
		case len(ids) > 0:
			// Starting from scratch would emit everything again.
			return nil, nil, fmt.Errorf("takeover of task %d: it has checkpoints %v but none is readable; refusing to start over", t.cfg.Task, ids)
		default:
			offsets, err := t.cfg.Input.StartOffsets(ctx, t.cfg.Task)
			if err != nil {
				return nil, nil, err
			}
			c = Checkpoint{Job: t.job, Task: t.cfg.Task, Offsets: offsets, CommittedOffsets: offsets}
		}
		c.ID = 1
		if len(ids) > 0 {
			c.ID = ids[0] + 1
		}
		c.Kind = KindClaim
		c.Owner = t.cfg.Owner
		c.CreatedAt = time.Now().UTC()
		err = t.createMetadata(ctx, &c)
		if err == nil {
			// An earlier owner whose checkpoints failed has an id counter
			// beyond this claim and may have completed a newer checkpoint
			// since the listing. It checks for newer checkpoints after its
			// create too (checkNotTakenOver), so at least one of the two
			// sees the other: here, the claim is stale; start over from the
			// newest checkpoint.
			newer, lerr := ListCheckpointIDs(ctx, t.cfg.Storage, t.job, t.cfg.Task)
			if lerr != nil {
				return nil, nil, fmt.Errorf("claim of task %d: %w", t.cfg.Task, lerr)
			}
			if len(newer) == 0 || newer[0] <= c.ID {
				return &c, known, nil
			}
			err = fmt.Errorf("checkpoint %d completed by another owner after this claim of %d: %w", newer[0], c.ID, ErrTakenOver)
		}
		if !errors.Is(err, ErrTakenOver) || attempt == maxClaimAttempts {
			return nil, nil, fmt.Errorf("claim of task %d: %w", t.cfg.Task, err)
		}
		t.log.Info("another owner completed the checkpoint this takeover tried to claim; retrying", "checkpoint", c.ID)
	}
}

// recoverPending commits the claim's pending transactions in order. If all
// commit, the task runs from the claim. If one was lost at the broker, the
// task rolls back: it restores the newest checkpoint whose state is not
// ahead of the committed output and replays, suppressing output that is
// already committed. The rollback is recorded as another claim, so a crash
// right after it does not have to decide again.
func (t *Task) recoverPending(ctx context.Context, claim *Checkpoint, known []*Checkpoint) (*Checkpoint, error) {
	committed := maps.Clone(claim.CommittedOffsets)
	var lost *PendingTxn
	for i := range claim.Pending {
		p := &claim.Pending[i]
		outcomes, err := t.cfg.Sink.Recover(ctx, t.cfg.Task, []sink.Committable{p.Committable})
		if err != nil {
			return nil, fmt.Errorf("recover transaction of checkpoint %d of task %d: %w", p.CheckpointID, t.cfg.Task, err)
		}
		if err := t.step(StepRecoveryCommit, p.CheckpointID); err != nil {
			return nil, err
		}
		if len(outcomes) != 1 || outcomes[0] != sink.Committed {
			lost = p
			break
		}
		committed = maxOffsets(committed, p.Offsets)
	}
	from := *claim
	from.Pending = nil
	from.CommittedOffsets = committed
	if lost == nil {
		return &from, nil
	}
	var target *Checkpoint
	for _, c := range known {
		if offsetsLE(c.Offsets, committed) {
			target = c
			break
		}
	}
	if target == nil {
		return nil, fmt.Errorf("task %d: the transaction of checkpoint %d was lost at the broker and no retained checkpoint is old enough to replay its input (need one at or before offsets %v)",
			t.cfg.Task, lost.CheckpointID, committed)
	}
	t.log.Warn("TRANSACTION LOST at the broker (aborted by its timeout or a broker crash): rolling back and replaying; output already committed is suppressed",
		"lost_checkpoint", lost.CheckpointID, "restore_checkpoint", target.ID, "replay_from", target.Offsets, "suppress_below", committed)
	rollback := *target
	rollback.ID = claim.ID + 1
	rollback.Kind = KindClaim
	rollback.Owner = t.cfg.Owner
	rollback.CreatedAt = time.Now().UTC()
	rollback.Pending = nil
	rollback.CommittedOffsets = committed
	if err := t.createMetadata(ctx, &rollback); err != nil {
		return nil, fmt.Errorf("record rollback of task %d: %w", t.cfg.Task, err)
	}
	return &rollback, nil
}

// createMetadata completes a checkpoint (or a claim) by creating its metadata
// if absent. "Already exists" is read back: this owner's own earlier write
// (an answer lost on the way) counts as success; anyone else's means the task
// was taken over.
func (t *Task) createMetadata(ctx context.Context, c *Checkpoint) error {
	data, err := EncodeCheckpoint(c)
	if err != nil {
		return fmt.Errorf("checkpoint %d of task %d: %w", c.ID, t.cfg.Task, err)
	}
	name := MetadataName(t.job, t.cfg.Task, c.ID)
	err = t.cfg.Storage.Create(ctx, name, data)
	if !errors.Is(err, ErrExists) {
		if err != nil {
			return fmt.Errorf("create metadata of checkpoint %d of task %d: %w", c.ID, t.cfg.Task, err)
		}
		return nil
	}
	existing, rerr := LoadCheckpoint(ctx, t.cfg.Storage, t.job, t.cfg.Task, c.ID)
	if rerr == nil && existing.Owner == t.cfg.Owner {
		return nil
	}
	return fmt.Errorf("checkpoint %d of task %d exists, written by another owner: %w", c.ID, t.cfg.Task, ErrTakenOver)
}

// offsetsLE reports whether position a is at or before b for every topic.
func offsetsLE(a, b map[string]int64) bool {
	for k, v := range a {
		if w, ok := b[k]; ok && v > w {
			return false
		}
	}
	return true
}

func maxOffsets(a, b map[string]int64) map[string]int64 {
	out := maps.Clone(a)
	if out == nil {
		out = map[string]int64{}
	}
	for k, v := range b {
		if v > out[k] {
			out[k] = v
		}
	}
	return out
}
