package coordinator

import (
	"fmt"
	"testing"

	"github.com/twmb/franz-go/pkg/kgo"
)

// TestKafkaPartitionMatchesClients checks KafkaPartition against Kafka's
// published murmur2 values and franz-go's default key partitioner.
func TestKafkaPartitionMatchesClients(t *testing.T) {
	// From Kafka's DefaultPartitionerTest / UtilsTest.
	for key, want := range map[string]int32{"21": -973932308, "foobar": -790332482, "a-little-bit-long-string": -985981536} {
		if got := int32(murmur2([]byte(key))); got != want {
			t.Errorf("murmur2(%q) = %d, want %d", key, got, want)
		}
	}
	p := kgo.StickyKeyPartitioner(nil).ForTopic("t")
	for _, n := range []int32{1, 3, 8, 12, 100} {
		for i := range 2000 {
			key := fmt.Appendf(nil, "key-%d", i)
			want := int32(p.Partition(&kgo.Record{Key: key}, int(n)))
			if got := KafkaPartition(key, n); got != want {
				t.Fatalf("KafkaPartition(%q, %d) = %d, franz-go says %d", key, n, got, want)
			}
		}
	}
}
