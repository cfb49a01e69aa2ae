package service_test

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/sluice-stream/sluice/coordinator"
)

// grpZombieHook pauses an instance's tasks at one protocol step once armed,
// and, once they are resumed, records every step that would complete or
// commit anything while the window is open.
type grpZombieHook struct {
	at     coordinator.Step
	resume chan struct{}
	// fails is how many of each task's checkpoints fail (their metadata
	// create, see fault) before the one that pauses, when at is
	// StepUploaded: the failed checkpoints' ids are a gap between the
	// task's newest complete checkpoint and the one that pauses.
	fails int

	mu        sync.Mutex
	armed     bool
	paused    map[int32]bool
	pausedID  map[int32]int64 // checkpoint id each task paused at
	failed    map[int32]int
	failNames map[string]bool
	window    bool
	progress  []string // completing steps seen in the window
}

func newGrpZombieHook(at coordinator.Step) *grpZombieHook {
	return &grpZombieHook{at: at, resume: make(chan struct{}), paused: map[int32]bool{},
		pausedID: map[int32]int64{}, failed: map[int32]int{}, failNames: map[string]bool{}}
}

var errGrpInjected = errors.New("injected storage fault: metadata create failed")

// fault is a coordinator.FaultFunc failing the metadata creates the hook
// chose.
func (h *grpZombieHook) fault(op coordinator.Op, name string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if op == coordinator.OpCreate && h.failNames[name] {
		delete(h.failNames, name)
		return errGrpInjected
	}
	return nil
}

func (h *grpZombieHook) hook(task int32, s coordinator.Step, id int64) error {
	h.mu.Lock()
	switch s {
	case coordinator.StepMetadataCreated, coordinator.StepTxnCommitted, coordinator.StepCommitted,
		coordinator.StepClaimed, coordinator.StepRecoveryCommit, coordinator.StepFenced:
		if h.window {
			h.progress = append(h.progress, fmt.Sprintf("task %d %s %d", task, s, id))
		}
	}
	pause := h.armed && s == h.at
	if pause && s == coordinator.StepUploaded && h.failed[task] < h.fails {
		h.failed[task]++
		h.failNames[coordinator.MetadataName(grpJob, task, id)] = true
		pause = false
	}
	if pause {
		h.paused[task] = true
		h.pausedID[task] = id
	}
	h.mu.Unlock()
	if pause {
		<-h.resume // a stop-the-world pause (GC, SIGSTOP, a partition)
	}
	return nil
}

func (h *grpZombieHook) arm() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.armed = true
}

func (h *grpZombieHook) pausedTasks() []int32 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return grpSortedKeys(h.paused)
}

// wake resumes the paused tasks and opens the window in which any
// completing step is a zombie's.
func (h *grpZombieHook) wake() {
	h.mu.Lock()
	h.armed = false
	h.window = true
	h.mu.Unlock()
	close(h.resume)
}

// closeWindow closes the window and returns what completed in it.
func (h *grpZombieHook) closeWindow() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.window = false
	return slices.Clone(h.progress)
}

// grpHoldHeartbeats holds every heartbeat of the given member in the
// broker (classic Heartbeat or KIP-848 ConsumerGroupHeartbeat), unanswered,
// until release is closed: to the group the member has gone silent (its
// session expires), while the member itself waits for the answer and goes
// on believing it owns its partitions, like a process cut off from the
// group coordinator. Only that member's heartbeats are held: its Kafka
// source and sink clients keep working.
func grpHoldHeartbeats(c *kfake.Cluster, protocol, memberID string, release <-chan struct{}) *atomic.Int64 {
	var held atomic.Int64
	key := kmsg.Heartbeat
	if protocol == "consumer" {
		key = kmsg.ConsumerGroupHeartbeat
	}
	c.ControlKey(int16(key), func(req kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		var member string
		switch r := req.(type) {
		case *kmsg.HeartbeatRequest:
			member = r.MemberID
		case *kmsg.ConsumerGroupHeartbeatRequest:
			member = r.MemberID
		}
		if member != memberID {
			return nil, nil, false
		}
		select {
		case <-release:
			return nil, nil, false
		default:
		}
		held.Add(1)
		c.SleepControl(func() { <-release })
		return nil, nil, false // then the broker answers it (unknown or fenced member by then)
	})
	return &held
}

// grpMemberOf returns the group member id whose assignment is exactly tasks.
func grpMemberOf(c *kfake.Cluster, tasks []int32) string {
	g := c.GroupInfo(grpJob)
	if g == nil {
		return ""
	}
	for _, m := range g.Members {
		got := slices.Sorted(slices.Values(m.Assignment[grpInput]))
		if slices.Equal(got, tasks) {
			return m.MemberID
		}
	}
	return ""
}

// TestGroupZombie pauses one of 3 instances (Z) past its session timeout
// and resumes it after the group moved its tasks: the zombie can neither
// complete a checkpoint nor commit.
//
// The pause is made of two deterministic parts:
//   - Z's tasks are stopped inside a Config.Hook at a protocol step (the
//     checkpointer before its metadata create, or the record loop);
//   - Z's group member goes silent: the broker holds its heartbeats
//     unanswered (a kfake control on Heartbeat requests from Z's member id).
//     kgo heartbeats from a goroutine of its own, so pausing the tasks
//     alone would never expire the session; holding the heartbeats does,
//     without Z's client noticing anything (no error comes back).
//
// Z's other clients keep working (no network partition of the data path):
// in the "checkpointer" case its record loop even goes on processing new
// input into its open transaction while A and B take its tasks over
// (claim, recovery commit, fencing). Then Z's tasks resume while its
// heartbeats are still held, so Z still believes it owns them: the paused
// checkpoint's metadata create finds the new owner's claim (ErrTakenOver),
// or its flush finds its producer fenced (sink.ErrFenced). Either stops the
// task, and the instance must not take it back while the group has not
// said it still owns it. Only then are the heartbeats answered (unknown
// member), Z learns it lost its tasks, rejoins and gets a share again
// legitimately.
//
// Proof: no checkpoint completion, commit or claim by Z in the window
// between its resume and the group telling it; Z did write output after the
// takeover (else nothing would be proven); and a separate read_committed
// reader sees every input's count exactly once (any of the zombie's
// post-takeover output that became visible would double a count).
//
// Z commits no offsets to the group (Settings.CommitOffsets off): its
// OffsetCommit would wait behind the held heartbeat on the same connection
// and stall its checkpointer until the checkpoint timeout, which is the
// realistic cost of a silent coordinator but slows the test.
func TestGroupZombie(t *testing.T) {
	type zcase struct {
		protocol, name string
		at             coordinator.Step
	}
	var cases []zcase
	for _, protocol := range grpProtocols() {
		cases = append(cases,
			zcase{protocol, "checkpointer", coordinator.StepUploaded},
			zcase{protocol, "record-loop", coordinator.StepRecord})
	}
	for _, tc := range cases {
		t.Run(tc.protocol+"/"+tc.name, func(t *testing.T) {
			e := newGrpEnv(t)
			zh := newGrpZombieHook(tc.at)
			a := e.start(e.config("A", tc.protocol))
			b := e.start(e.config("B", tc.protocol))
			zc := e.config("Z", tc.protocol)
			zc.Hook = zh.hook
			zc.Settings.CommitOffsets = false
			z := e.start(zc)
			e.waitBalanced(a, b, z)
			pr := e.produce(5, 20*time.Millisecond)
			for _, in := range []*grpInstance{a, b, z} {
				e.waitProgress(in, 50)
			}
			zTasks := z.tasks()
			var member string
			grpWait(t, 30*time.Second, fmt.Sprintf("Z's member id (owner of %v)", zTasks), func() bool {
				member = grpMemberOf(e.cluster, zTasks)
				return member != ""
			})

			// Pause Z's tasks, then silence its member.
			zh.arm()
			grpWait(t, 30*time.Second, fmt.Sprintf("Z's tasks %v paused at %s", zTasks, tc.at), func() bool {
				return slices.Equal(zh.pausedTasks(), zTasks)
			})
			release := make(chan struct{})
			var releaseOnce sync.Once
			releaseHB := func() { releaseOnce.Do(func() { close(release) }) }
			t.Cleanup(releaseHB)
			held := grpHoldHeartbeats(e.cluster, tc.protocol, member, release)

			// The group expels Z after its session timeout; A and B take its
			// tasks over (claimed, recovered, fenced, restored).
			e.waitBalanced(a, b)
			if held.Load() == 0 {
				t.Fatal("no heartbeat of Z was held, yet Z left the group: the zombie was not staged")
			}
			outAtTakeover := map[int32]int64{}
			for _, task := range zTasks {
				outAtTakeover[task] = z.stats()[task].RecordsOut.Load()
			}
			if tc.at != coordinator.StepRecord {
				// The zombie's record loop is not paused: it writes output
				// for input the new owners also process.
				grpWait(t, 30*time.Second, "the zombie writing output after the takeover", func() bool {
					for _, task := range zTasks {
						if z.stats()[task].RecordsOut.Load() <= outAtTakeover[task] {
							return false
						}
					}
					return true
				})
			}
			if got := z.tasks(); !slices.Equal(got, zTasks) {
				t.Fatalf("Z runs %v, want still %v: it learned of the rebalance while silenced", got, zTasks)
			}

			// Resume Z's tasks while it still believes it owns them.
			mark := e.log.mark()
			zh.wake()
			grpWait(t, 30*time.Second, "the zombie's tasks to stop, each restart postponed", func() bool {
				return len(grpZombieStops(e.log.since(mark), zTasks)) == len(zTasks)
			}, func() string { return "(log: " + strings.Join(grpZombieLines(e.log.since(mark)), " | ") + ")" })
			for task, line := range grpZombieStops(e.log.since(mark), zTasks) {
				if !strings.Contains(line, coordinator.ErrTakenOver.Error()) && !strings.Contains(line, "fenced") {
					t.Errorf("zombie task %d stopped for another reason than a takeover or fencing: %s", task, line)
				}
				if strings.Contains(line, "backoff=50ms") || strings.Contains(line, "backoff=100ms") {
					t.Errorf("zombie task %d is restarted at once, not only once the group says it still owns it: it would claim the task back from its new owner and the two would keep fencing each other: %s", task, line)
				}
			}
			for _, task := range zTasks {
				if got := z.stats()[task].RecordsOut.Load(); got <= outAtTakeover[task] {
					t.Fatalf("zombie task %d wrote no output after the takeover (%d records, as at the takeover): nothing would be proven", task, got)
				}
			}

			// Now the group answers Z: unknown member. Z loses its tasks
			// (no final checkpoint), rejoins and gets a share again.
			releaseHB()
			grpWait(t, 30*time.Second, "Z to learn it lost its tasks", func() bool {
				return strings.Contains(e.log.since(mark), "instance=Z tasks=")
			})
			lost := false
			for _, line := range strings.Split(e.log.since(mark), "\n") {
				if strings.Contains(line, "instance=Z") && strings.Contains(line, "tasks lost") {
					lost = true
					break
				}
				if strings.Contains(line, "instance=Z") && strings.Contains(line, "task restored") {
					t.Errorf("the zombie took a task back before the group told it it lost it: %s", line)
				}
			}
			if !lost {
				t.Errorf("Z was not told it lost its tasks (expected the lost callback after its session expired)")
			}
			if done := zh.closeWindow(); len(done) > 0 {
				t.Errorf("the zombie completed or committed while the group had moved its tasks: %v", done)
			}
			e.waitBalanced(a, b, z)
			e.waitProgress(z, 50)

			if err := pr.stop(); err != nil {
				t.Fatalf("produce: %v", err)
			}
			e.waitOutput(60 * time.Second)
			for _, in := range []*grpInstance{a, b, z} {
				if err := in.stop(); err != nil {
					t.Fatalf("stop %s: %v", in.name, err)
				}
			}
			e.checkExactlyOnce()
		})
	}
}

// grpZombieStops returns, per task of Z, the log line in which its
// supervisor stopped it after the resume.
func grpZombieStops(log string, tasks []int32) map[int32]string {
	out := map[int32]string{}
	for _, line := range strings.Split(log, "\n") {
		if !strings.Contains(line, "instance=Z") || !strings.Contains(line, "task failed") {
			continue
		}
		for _, task := range tasks {
			if _, ok := out[task]; !ok && strings.Contains(line, fmt.Sprintf(" task=%d ", task)) {
				out[task] = line
			}
		}
	}
	return out
}

// grpZombieLines returns Z's warnings and errors, for failure messages.
func grpZombieLines(log string) []string {
	var out []string
	for _, line := range strings.Split(log, "\n") {
		if strings.Contains(line, "instance=Z") && (strings.Contains(line, "WARN") || strings.Contains(line, "ERROR")) {
			out = append(out, line)
		}
	}
	return out
}
