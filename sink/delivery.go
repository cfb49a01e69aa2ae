package sink

import (
	"fmt"
	"strings"
)

// Delivery is the guarantee a Kafka sink gives for its output. The zero value
// is ExactlyOnce, so a config that does not mention it gets the strongest
// guarantee.
type Delivery int

const (
	// ExactlyOnce writes each task's output between two barriers in one Kafka
	// transaction, committed when the checkpoint completes. Readers must use
	// read_committed.
	ExactlyOnce Delivery = iota
	// AtLeastOnce writes with the idempotent producer (acks=all) and waits at
	// every barrier until the records before it are acknowledged: nothing is
	// lost, but a replay after a failure writes some records again.
	AtLeastOnce
	// None writes with acks=1 and never waits: records can be lost or
	// duplicated on failures.
	None
)

// String returns the flag spelling of d: "exactly-once", "at-least-once" or
// "none".
func (d Delivery) String() string {
	switch d {
	case ExactlyOnce:
		return "exactly-once"
	case AtLeastOnce:
		return "at-least-once"
	case None:
		return "none"
	}
	return fmt.Sprintf("Delivery(%d)", int(d))
}

// ParseDelivery parses a flag value: "exactly-once", "at-least-once" or
// "none" (case-insensitive; underscores are accepted for dashes).
func ParseDelivery(s string) (Delivery, error) {
	switch strings.ReplaceAll(strings.ToLower(strings.TrimSpace(s)), "_", "-") {
	case "exactly-once":
		return ExactlyOnce, nil
	case "at-least-once":
		return AtLeastOnce, nil
	case "none":
		return None, nil
	}
	return 0, fmt.Errorf("unknown delivery %q: want exactly-once, at-least-once or none", s)
}

// valid reports whether d is one of the defined guarantees.
func (d Delivery) valid() bool { return d >= ExactlyOnce && d <= None }
