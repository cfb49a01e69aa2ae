package sink

import (
	"os"
	"sync/atomic"
	"testing"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

func TestZZAmbig(t *testing.T) {
	for i := 0; i < 60; i++ {
		c := newCluster(t)
		k := newSink(t, c, func(cfg *KafkaConfig) {
			cfg.ClientOpts = append(cfg.ClientOpts, kgo.WithLogger(kgo.BasicLogger(os.Stderr, kgo.LogLevelInfo, func() string { return "KGO " })))
		})
		w := newWriter(t, k, 0)
		writeBatch(w, "c1", 10)
		c1 := preCommit(t, w, 1)
		var intercepted atomic.Int64
		c.ControlKey(int16(kmsg.EndTxn), func(req kmsg.Request) (kmsg.Response, error, bool) {
			intercepted.Add(1)
			resp := req.ResponseKind().(*kmsg.EndTxnResponse)
			resp.SetVersion(req.GetVersion())
			resp.ErrorCode = kerr.UnknownServerError.Code
			resp.ProducerID, resp.ProducerEpoch = -1, -1
			return resp, nil, true
		})
		os.Stderr.WriteString("=========== COMMIT\n")
		if err := w.Commit(testCtx(t), []Committable{c1}); err != nil {
			t.Fatalf("iter %d: commit with an ambiguous answer: %v", i, err)
		}
		w.Close()
		k.Close()
		c.Close()
	}
}
