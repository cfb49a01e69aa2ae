package state

import (
	"io"
	"os"
	"path/filepath"
	"testing"
)

// factories are the backends every backend-level test runs against.
func factories(t testing.TB) map[string]Factory {
	pf := NewPebbleFactory(8 << 20)
	t.Cleanup(func() { _ = pf.Close() })
	return map[string]Factory{"pebble": pf, "memory": NewMemoryFactory()}
}

func openBackend(t testing.TB, f Factory, dir string) Backend {
	t.Helper()
	b, err := f.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

// dump returns the whole content of anything that scans.
func dump(t testing.TB, scan func([]byte, func(k, v []byte) error) error, prefix string) map[string]string {
	t.Helper()
	m := map[string]string{}
	var last string
	err := scan([]byte(prefix), func(k, v []byte) error {
		if len(m) > 0 && string(k) <= last {
			t.Errorf("scan out of order: %q after %q", k, last)
		}
		last = string(k)
		m[string(k)] = string(v)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// copyFiles copies the named files from src to a new directory dst, as the
// coordinator does when it restores a checkpoint from storage.
func copyFiles(t testing.TB, src, dst string, names []string) {
	t.Helper()
	for _, n := range names {
		copyFile(t, filepath.Join(src, n), filepath.Join(dst, n))
	}
}

func copyFile(t testing.TB, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := os.Create(to)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}
