package sink

import (
	"testing"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kversion"
)

// Against a cluster without transaction protocol v2 (Kafka 3.9: EndTxn v4,
// the epoch does not move per transaction) recovery resumes with EndTxn v4.
func TestTransactionProtocolV1(t *testing.T) {
	c := newCluster(t, kfake.MaxVersions(kversion.V3_9_0()))
	a := newSink(t, c, nil)
	if a.tv2 {
		t.Fatal("a 3.9 cluster reported transaction protocol v2")
	}
	w := newWriter(t, a, 0)
	var vs [][]string
	var cs []Committable
	for id := int64(1); id <= 4; id++ {
		vs = append(vs, writeBatch(w, "c"+string(rune('0'+id)), 10))
		cs = append(cs, preCommit(t, w, id))
		if id == 2 { // commit 1 and 2; 3 and 4 stay pending for the crash
			if err := w.Commit(testCtx(t), cs[:2]); err != nil {
				t.Fatal(err)
			}
		}
	}
	if cs[3].ProducerID != cs[0].ProducerID || cs[3].Epoch != cs[0].Epoch {
		t.Errorf("slot 0 moved from %d/%d to %d/%d: v1 keeps the epoch", cs[0].ProducerID, cs[0].Epoch, cs[3].ProducerID, cs[3].Epoch)
	}
	w.Close()
	b := newSink(t, c, nil)
	outs, err := b.Recover(testCtx(t), 0, cs)
	if err != nil {
		t.Fatal(err)
	}
	for i, o := range outs {
		if o != Committed {
			t.Fatalf("outcome %d: %v", i, o)
		}
	}
	expectExactly(t, readCommitted(t, c, outTopic, outPartitions), vs...)

	// Fencing loses a pending transaction under v1 too.
	w2 := newWriter(t, b, 0)
	v5 := writeBatch(w2, "c5", 10)
	c5 := preCommit(t, w2, 5)
	w2.Close()
	newWriter(t, newSink(t, c, nil), 0)
	if outs, err := b.Recover(testCtx(t), 0, []Committable{c5}); err != nil || len(outs) != 1 || outs[0] != Lost {
		t.Fatalf("recover fenced: %v %v", outs, err)
	}
	expectNone(t, readCommitted(t, c, outTopic, outPartitions), v5)
}
