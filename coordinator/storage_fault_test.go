package coordinator

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestFaultyStorageContract(t *testing.T) {
	storageContract(t, func(*testing.T) Storage { return NewFaultyStorage(NewMemStorage()) })
}

func TestFaultyStorageFaultBefore(t *testing.T) {
	ctx := context.Background()
	mem := NewMemStorage()
	f := NewFaultyStorage(mem)
	boom := errors.New("boom")
	var seen []string
	f.SetFault(func(op Op, name string) error {
		seen = append(seen, string(op)+" "+name)
		if op == OpCreate || op == OpPut {
			return boom
		}
		return nil
	})
	if err := f.Create(ctx, "a", []byte("x")); !errors.Is(err, boom) {
		t.Fatalf("Create: %v", err)
	}
	if err := f.Put(ctx, "b", strings.NewReader("x")); !errors.Is(err, boom) {
		t.Fatalf("Put: %v", err)
	}
	if _, err := f.List(ctx, "p/"); err != nil {
		t.Fatalf("List: %v", err)
	}
	if len(mem.Names()) != 0 {
		t.Fatalf("a failed op took effect: %q", mem.Names())
	}
	if want := []string{"create a", "put b", "list p/"}; strings.Join(seen, ",") != strings.Join(want, ",") {
		t.Fatalf("injector saw %q, want %q", seen, want)
	}
	f.SetFault(nil)
	if err := f.Create(ctx, "a", []byte("x")); err != nil {
		t.Fatalf("after clearing: %v", err)
	}
}

func TestFaultyStorageFaultAfter(t *testing.T) {
	ctx := context.Background()
	mem := NewMemStorage()
	f := NewFaultyStorage(mem)
	lost := errors.New("answer lost")
	f.SetFaultAfter(func(op Op, name string) error {
		if op == OpCreate || op == OpDelete || op == OpGet {
			return lost
		}
		return nil
	})
	if err := f.Create(ctx, "m", []byte("mine")); !errors.Is(err, lost) {
		t.Fatalf("Create: %v", err)
	}
	// It took effect: a retry finds it, and it has our content.
	if err := f.Create(ctx, "m", []byte("mine")); !errors.Is(err, ErrExists) {
		t.Fatalf("retried Create: %v, want ErrExists", err)
	}
	if got := storageRead(t, mem, "m"); got != "mine" {
		t.Fatalf("got %q", got)
	}
	if _, err := f.Get(ctx, "m"); !errors.Is(err, lost) {
		t.Fatalf("Get: %v", err)
	}
	if err := f.Delete(ctx, "m"); !errors.Is(err, lost) {
		t.Fatalf("Delete: %v", err)
	}
	if len(mem.Names()) != 0 {
		t.Fatalf("Delete did not take effect: %q", mem.Names())
	}
	// An op that fails by itself is not turned into a success-with-lost-answer.
	if _, err := f.Get(ctx, "m"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get missing: %v", err)
	}
}

func TestFaultyStorageStall(t *testing.T) {
	ctx := context.Background()
	mem := NewMemStorage()
	f := NewFaultyStorage(mem)
	f.Stall()

	// A stalled op gives up with its context and does not take effect.
	tctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if err := f.Create(tctx, "a", []byte("x")); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("stalled Create: %v", err)
	}
	if len(mem.Names()) != 0 || f.Waiting() != 0 {
		t.Fatalf("names %q, waiting %d", mem.Names(), f.Waiting())
	}

	// Unstall releases a blocked op, which then takes effect.
	done := make(chan error, 1)
	go func() { done <- f.Put(ctx, "b", strings.NewReader("x")) }()
	for f.Waiting() != 1 {
		time.Sleep(time.Millisecond)
	}
	select {
	case err := <-done:
		t.Fatalf("Put returned while stalled: %v", err)
	default:
	}
	f.Unstall()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := storageRead(t, f, "b"); got != "x" {
		t.Fatalf("got %q", got)
	}
	f.Unstall() // unstalling twice is harmless
}
