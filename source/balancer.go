package source

import (
	"maps"
	"slices"
	"sort"

	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// TaskBalancer is the job's group balancer: it assigns tasks, not
// partitions. Partition p of every input topic goes to the same member (a
// task reads its co-partitioned inputs together), members get an equal
// number of tasks (±1), a task stays with its owner whenever the balance
// allows (sticky), and it is cooperative: a task moving to another member is
// first revoked, and assigned only in the following rebalance, so its old
// owner can take a final checkpoint before the new one takes over.
func TaskBalancer() kgo.GroupBalancer { return taskBalancer{} }

type taskBalancer struct{}

func (taskBalancer) ProtocolName() string { return "sluice-task-sticky" }

func (taskBalancer) IsCooperative() bool { return true }

func (taskBalancer) JoinGroupMetadata(interests []string, current map[string][]int32, generation int32) []byte {
	meta := kmsg.NewConsumerMemberMetadata()
	meta.Version = 3
	meta.Topics = slices.Sorted(slices.Values(interests))
	meta.Generation = generation
	for _, topic := range slices.Sorted(maps.Keys(current)) {
		owned := kmsg.NewConsumerMemberMetadataOwnedPartition()
		owned.Topic = topic
		owned.Partitions = slices.Sorted(slices.Values(current[topic]))
		meta.OwnedPartitions = append(meta.OwnedPartitions, owned)
	}
	return meta.AppendTo(nil)
}

func (taskBalancer) ParseSyncAssignment(assignment []byte) (map[string][]int32, error) {
	return kgo.ParseConsumerSyncAssignment(assignment)
}

func (t taskBalancer) MemberBalancer(members []kmsg.JoinGroupResponseMember) (kgo.GroupMemberBalancer, map[string]struct{}, error) {
	b, err := kgo.NewConsumerBalancer(t, members)
	if err != nil {
		return nil, nil, err
	}
	return b, b.MemberTopics(), nil
}

// Balance plans the assignment. Tasks are the partition indexes every input
// topic has (co-partitioned topics have the same count).
func (taskBalancer) Balance(b *kgo.ConsumerBalancer, topics map[string]int32) kgo.IntoSyncAssignment {
	tasks := int32(-1)
	for _, n := range topics {
		if tasks < 0 || n < tasks {
			tasks = n
		}
	}
	type member struct {
		m     *kmsg.JoinGroupResponseMember
		owned []int32 // tasks it owns now, by the highest-generation claim
		plan  []int32
	}
	var members []*member
	claim := map[int32]int32{} // task → generation of the owning claim
	owner := map[int32]int{}   // task → index into members
	b.EachMember(func(m *kmsg.JoinGroupResponseMember, meta *kmsg.ConsumerMemberMetadata) {
		i := len(members)
		members = append(members, &member{m: m})
		for _, o := range meta.OwnedPartitions {
			if _, ok := topics[o.Topic]; !ok {
				continue
			}
			for _, p := range o.Partitions {
				if p >= tasks {
					continue
				}
				// A member that missed rebalances may still claim a task
				// another member owns at a newer generation: ignore it.
				if g, ok := claim[p]; ok && g >= meta.Generation && owner[p] != i {
					continue
				}
				claim[p] = meta.Generation
				owner[p] = i
			}
		}
	})
	for p, i := range owner {
		members[i].owned = append(members[i].owned, p)
	}
	sort.Slice(members, func(i, j int) bool { return members[i].m.MemberID < members[j].m.MemberID })
	// Quotas: everyone gets tasks/len, the members owning most get the +1s,
	// so as few tasks as possible move.
	order := slices.Clone(members)
	sort.SliceStable(order, func(i, j int) bool { return len(order[i].owned) > len(order[j].owned) })
	base, extra := int(tasks)/max(len(members), 1), int(tasks)%max(len(members), 1)
	quota := map[*member]int{}
	for i, m := range order {
		quota[m] = base
		if i < extra {
			quota[m]++
		}
	}
	var free []int32
	assigned := map[int32]bool{}
	for _, m := range members {
		slices.Sort(m.owned)
		for _, p := range m.owned {
			if len(m.plan) < quota[m] && !assigned[p] {
				m.plan = append(m.plan, p)
				assigned[p] = true
			}
		}
	}
	for p := range tasks {
		if !assigned[p] {
			free = append(free, p)
		}
	}
	for _, m := range members {
		for len(m.plan) < quota[m] && len(free) > 0 {
			m.plan = append(m.plan, free[0])
			free = free[1:]
		}
	}
	plan := b.NewPlan()
	for _, m := range members {
		for topic := range topics {
			plan.AddPartitions(m.m, topic, m.plan)
		}
	}
	plan.AdjustCooperative(b)
	return plan
}
