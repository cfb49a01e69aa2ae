package source

import (
	"maps"
	"slices"
	"testing"

	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// groupRound runs one rebalance of the task balancer: each member joins with
// what it owns, and the returned assignment is what each member gets.
func groupRound(t *testing.T, topics map[string]int32, owned map[string]map[string][]int32, gen int32) map[string]map[string][]int32 {
	t.Helper()
	bal := TaskBalancer()
	var interests []string
	for tp := range topics {
		interests = append(interests, tp)
	}
	var members []kmsg.JoinGroupResponseMember
	for _, id := range slices.Sorted(maps.Keys(owned)) {
		m := kmsg.NewJoinGroupResponseMember()
		m.MemberID = id
		m.ProtocolMetadata = bal.JoinGroupMetadata(interests, owned[id], gen)
		members = append(members, m)
	}
	mb, _, err := bal.MemberBalancer(members)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]map[string][]int32{}
	for _, a := range mustBalance(t, mb, topics) {
		got, err := bal.ParseSyncAssignment(a.MemberAssignment)
		if err != nil {
			t.Fatal(err)
		}
		for tp := range got {
			slices.Sort(got[tp])
		}
		out[a.MemberID] = got
	}
	return out
}

// checkTasks asserts that every member has the same partitions of every
// topic (whole tasks) and returns each member's tasks.
func checkTasks(t *testing.T, asg map[string]map[string][]int32, topics map[string]int32) map[string][]int32 {
	t.Helper()
	tasks := map[string][]int32{}
	for m, byTopic := range asg {
		var first []int32
		for tp := range topics {
			ps := byTopic[tp]
			if first == nil {
				first = ps
			} else if !slices.Equal(first, ps) {
				t.Fatalf("member %s got partitions %v of one topic and %v of another: a task was split", m, first, ps)
			}
		}
		tasks[m] = first
	}
	return tasks
}

func TestTaskBalancerScaleOutAndIn(t *testing.T) {
	topics := map[string]int32{"clicks": 8, "views": 8}
	all := []int32{0, 1, 2, 3, 4, 5, 6, 7}
	both := func(ps []int32) map[string][]int32 { return map[string][]int32{"clicks": ps, "views": ps} }

	// One member gets everything.
	got := checkTasks(t, groupRound(t, topics, map[string]map[string][]int32{"a": nil}, -1), topics)
	if !slices.Equal(got["a"], all) {
		t.Fatalf("single member got %v", got["a"])
	}
	// Two members join: the owner keeps its quota, the moving tasks are only
	// revoked in this round (cooperative), nothing is owned twice.
	round1 := checkTasks(t, groupRound(t, topics, map[string]map[string][]int32{"a": both(all), "b": nil, "c": nil}, 1), topics)
	if len(round1["a"]) != 3 || len(round1["b"]) != 0 || len(round1["c"]) != 0 {
		t.Fatalf("first cooperative round: %v, want a to keep 3 and the others to wait", round1)
	}
	// Next round: the revoked tasks are spread over the new members.
	round2 := checkTasks(t, groupRound(t, topics, map[string]map[string][]int32{"a": both(round1["a"]), "b": nil, "c": nil}, 2), topics)
	seen := map[int32]string{}
	for m, ps := range round2 {
		if n := len(ps); n < 2 || n > 3 {
			t.Fatalf("member %s got %d tasks: %v", m, n, round2)
		}
		for _, p := range ps {
			if o, dup := seen[p]; dup {
				t.Fatalf("task %d assigned to %s and %s", p, o, m)
			}
			seen[p] = m
		}
	}
	if len(seen) != 8 || !slices.Equal(round2["a"], round1["a"]) {
		t.Fatalf("second round %v: want all 8 tasks, a keeping %v", round2, round1["a"])
	}
	// Scale in: c leaves; its tasks go to a and b, nobody else moves.
	round3 := checkTasks(t, groupRound(t, topics, map[string]map[string][]int32{"a": both(round2["a"]), "b": both(round2["b"])}, 3), topics)
	for _, m := range []string{"a", "b"} {
		for _, p := range round2[m] {
			if !slices.Contains(round3[m], p) {
				t.Fatalf("task %d moved away from %s on scale-in: %v → %v", p, m, round2, round3)
			}
		}
	}
	if len(round3["a"])+len(round3["b"]) != 8 {
		t.Fatalf("scale in lost tasks: %v", round3)
	}
}

func TestTaskBalancerIgnoresStaleClaims(t *testing.T) {
	topics := map[string]int32{"events": 4}
	// "old" missed a rebalance and still claims task 0 at generation 1,
	// which "new" owns at generation 2: only the current owner counts.
	bal := TaskBalancer()
	join := func(id string, owned map[string][]int32, gen int32) kmsg.JoinGroupResponseMember {
		m := kmsg.NewJoinGroupResponseMember()
		m.MemberID = id
		m.ProtocolMetadata = bal.JoinGroupMetadata([]string{"events"}, owned, gen)
		return m
	}
	mb, _, err := bal.MemberBalancer([]kmsg.JoinGroupResponseMember{
		join("new", map[string][]int32{"events": {0, 1}}, 2),
		join("old", map[string][]int32{"events": {0, 2, 3}}, 1),
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range mustBalance(t, mb, topics) {
		got, _ := bal.ParseSyncAssignment(a.MemberAssignment)
		if a.MemberID == "old" && slices.Contains(got["events"], 0) {
			t.Fatalf("stale claimant got task 0 back: %v", got)
		}
	}
}

func mustBalance(t *testing.T, mb kgo.GroupMemberBalancer, topics map[string]int32) []kmsg.SyncGroupRequestGroupAssignment {
	t.Helper()
	plan, err := mb.(*kgo.ConsumerBalancer).BalanceOrError(topics)
	if err != nil {
		t.Fatal(err)
	}
	return plan.IntoSyncAssignment()
}
