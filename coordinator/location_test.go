package coordinator

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sluice-stream/sluice/internal/s3test"
)

func TestLocationValidate(t *testing.T) {
	for _, tc := range []struct {
		loc  string
		want string // "" for valid, else a substring of the error
	}{
		{"/var/lib/sluice", ""},
		{"./checkpoints/", ""},
		{"checkpoints", ""},
		{"a:b", ""},      // a local directory named "a:b", not a URL
		{"./s3://x", ""}, // a local path
		{`C:\dir`, ""},   // a path, not a scheme
		{"file:///var/lib/sluice", ""},
		{"file://localhost/var/lib/sluice", ""},
		{"FILE:///x", ""},
		{"s3://my-bucket", ""},
		{"s3://my-bucket/", ""},
		{"s3://my-bucket/a/b/", ""},
		{"S3://my-bucket/a", ""},
		{"", "empty"},
		{"  ", "empty"},
		{"gs://bucket/x", `unknown scheme "gs"`},
		{"http://host/x", `unknown scheme "http"`},
		{"s3://", "bucket name"},
		{"s3:///prefix", "bucket name"},
		{"s3://My_Bucket/x", "bucket name"},
		{"s3://ab/x", "3 to 63"},
		{"s3://bucket/a/../b", `".." segment`},
		{"s3://bucket/a//b", "empty path segment"},
		{"s3://bucket/a?versionId=1", "query strings"},
		{"file://otherhost/x", `host "otherhost"`},
		{"file:relative", "absolute path"},
		{"file:///x?y", "query strings"},
	} {
		err := ValidateLocation(tc.loc)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("ValidateLocation(%q) = %v, want nil", tc.loc, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want) || !errors.Is(err, ErrBadLocation)):
			t.Errorf("ValidateLocation(%q) = %v, want an ErrBadLocation with %q", tc.loc, err, tc.want)
		}
	}
}

func TestLocationJoin(t *testing.T) {
	for _, tc := range []struct {
		loc  string
		elem []string
		want string
	}{
		// local, absolute and relative
		{"/data/ckpt", []string{"job/savepoints/sp-1"}, "/data/ckpt/job/savepoints/sp-1"},
		{"/data/ckpt/", []string{"job", "savepoints", "sp-1"}, "/data/ckpt/job/savepoints/sp-1"},
		{"/data/ckpt//", []string{"/job/", "/sp-1/"}, "/data/ckpt/job/sp-1"},
		{"/", []string{"a"}, "/a"},
		{"ckpt", []string{"a/b"}, "ckpt/a/b"},
		{"./ckpt/", []string{"a/b/"}, "ckpt/a/b"},
		{".", []string{"a"}, "a"},
		{"../up", []string{"a"}, "../up/a"},
		{"/data", []string{"./a/./b"}, "/data/a/b"},
		{"/data/x", []string{"../y"}, "/data/y"}, // lexical, documented
		// nothing to join: unchanged
		{"/data/ckpt/", nil, "/data/ckpt/"},
		{"s3://b-1/p/", []string{"", "/", "."}, "s3://b-1/p/"},
		// file URLs stay file URLs
		{"file:///data/ckpt", []string{"a/b"}, "file:///data/ckpt/a/b"},
		{"file:///data/ckpt/", []string{"a b"}, "file:///data/ckpt/a%20b"},
		{"file://localhost/data", []string{"a"}, "file:///data/a"},
		// s3 with and without prefix
		{"s3://bucket", []string{"job/savepoints/sp-1"}, "s3://bucket/job/savepoints/sp-1"},
		{"s3://bucket/", []string{"a", "b"}, "s3://bucket/a/b"},
		{"s3://bucket/prefix", []string{"a/b"}, "s3://bucket/prefix/a/b"},
		{"s3://bucket/pre/fix/", []string{"/a/", "b/"}, "s3://bucket/pre/fix/a/b"},
		{"S3://bucket/p", []string{"a"}, "s3://bucket/p/a"},
		{"s3://bucket/p", []string{"../a"}, "s3://bucket/p/../a"}, // OpenStorage rejects it
		// invalid locations are left as they are, for OpenStorage to report
		{"gs://bucket/p/", []string{"a"}, "gs://bucket/p/"},
		{"", []string{"a"}, ""},
		{"s3://", []string{"abc"}, "s3://"},
		{"s3://B", []string{"a"}, "s3://B"},
	} {
		if got := JoinLocation(tc.loc, tc.elem...); got != tc.want {
			t.Errorf("JoinLocation(%q, %q) = %q, want %q", tc.loc, tc.elem, got, tc.want)
		}
	}
	if err := ValidateLocation(JoinLocation("s3://bucket/p", "..", "a")); err == nil {
		t.Error(`JoinLocation("s3://bucket/p", "..", "a") is a valid location`)
	}
}

// checkSubLocation checks that the storage of JoinLocation(loc, "a/b") sees
// exactly the objects of the storage of loc under "a/b/" — not those of
// "a/bc/" — and that writes through either show in the other.
func checkSubLocation(t *testing.T, loc string, o StorageOptions) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	root, err := OpenStorage(ctx, loc, o)
	if err != nil {
		t.Fatal(err)
	}
	sub, err := OpenStorage(ctx, JoinLocation(loc, "a/b"), o)
	if err != nil {
		t.Fatal(err)
	}
	storagePut(t, root, "a/b/x", "x")
	storagePut(t, root, "a/b/c/y", "y")
	storagePut(t, root, "a/bc/z", "z")
	storagePut(t, root, "a/w", "w")
	storagePut(t, sub, "v", "v")
	names, err := sub.List(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"c/y", "v", "x"}; !slices.Equal(names, want) {
		t.Errorf("sub-location %s lists %q, want %q", sub, names, want)
	}
	if got := storageRead(t, sub, "c/y"); got != "y" {
		t.Errorf("sub-location reads %q", got)
	}
	if got := storageRead(t, root, "a/b/v"); got != "v" {
		t.Errorf("root reads %q for what the sub-location wrote", got)
	}
	// (LocalStorage.String does not escape, so a space makes it no URL.)
	if wantString := JoinLocation(root.String(), "a/b"); !strings.Contains(wantString, "%") && sub.String() != wantString {
		t.Errorf("sub-location String() = %q, want %q", sub.String(), wantString)
	}
}

func TestLocationOpenLocal(t *testing.T) {
	ctx := context.Background()
	t.Run("Dir", func(t *testing.T) {
		checkSubLocation(t, filepath.Join(t.TempDir(), "ckpt")+"/", StorageOptions{})
	})
	t.Run("FileURL", func(t *testing.T) {
		checkSubLocation(t, "file://"+filepath.ToSlash(filepath.Join(t.TempDir(), "with space")), StorageOptions{})
	})
	t.Run("Relative", func(t *testing.T) {
		dir := t.TempDir()
		t.Chdir(dir)
		checkSubLocation(t, "./ckpt", StorageOptions{})
		st, err := OpenStorage(ctx, "ckpt", StorageOptions{})
		if err != nil {
			t.Fatal(err)
		}
		// The root is the directory the relative path named when opened.
		if want := "file://" + filepath.ToSlash(filepath.Join(dir, "ckpt")); st.String() != want {
			t.Errorf("String() = %q, want %q", st.String(), want)
		}
	})
	t.Run("S3OptionsIgnored", func(t *testing.T) {
		checkSubLocation(t, t.TempDir(), StorageOptions{Endpoint: "http://127.0.0.1:1", Region: "x", PathStyle: true})
	})
	t.Run("BadLocation", func(t *testing.T) {
		_, err := OpenStorage(ctx, "gs://bucket/x", StorageOptions{})
		if !errors.Is(err, ErrBadLocation) || !strings.Contains(err.Error(), `unknown scheme "gs"`) {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("Unwritable", func(t *testing.T) {
		file := filepath.Join(t.TempDir(), "file")
		if err := os.WriteFile(file, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := OpenStorage(ctx, filepath.Join(file, "ckpt"), StorageOptions{})
		if err == nil || !strings.Contains(err.Error(), "is not writable") || !strings.Contains(err.Error(), file) {
			t.Fatalf("err = %v", err)
		}
		_, err = OpenStorage(ctx, file, StorageOptions{ReadOnly: true})
		if err == nil || !strings.Contains(err.Error(), "is not a directory") {
			t.Fatalf("read-only open of a file: err = %v", err)
		}
	})
	t.Run("ReadOnly", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "ckpt")
		_, err := OpenStorage(ctx, dir, StorageOptions{ReadOnly: true})
		if err == nil || !strings.Contains(err.Error(), dir+" does not exist") {
			t.Fatalf("err = %v", err)
		}
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("a read-only open created the directory: %v", err)
		}
		rw, err := OpenStorage(ctx, dir, StorageOptions{})
		if err != nil {
			t.Fatal(err)
		}
		storagePut(t, rw, "j/x", "x")
		ro, err := OpenStorage(ctx, "file://"+dir, StorageOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		if got := storageRead(t, ro, "j/x"); got != "x" {
			t.Fatalf("read %q", got)
		}
		if ro.String() != rw.String() {
			t.Errorf("String() = %q, want %q", ro.String(), rw.String())
		}
		for op, err := range map[string]error{
			"put":    ro.Put(ctx, "j/y", strings.NewReader("y")),
			"create": ro.Create(ctx, "j/y", []byte("y")),
			"delete": ro.Delete(ctx, "j/x"),
		} {
			if !errors.Is(err, ErrReadOnly) || !strings.Contains(err.Error(), op+" j/") {
				t.Errorf("%s: err = %v", op, err)
			}
		}
		if names, _ := rw.List(ctx, ""); !slices.Equal(names, []string{"j/x"}) {
			t.Errorf("after refused writes: %q", names)
		}
	})
}

// TestLocationOpenS3Errors needs no server: what fails before or at the
// first request.
func TestLocationOpenS3Errors(t *testing.T) {
	s3test.UseCredentials(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, tc := range []struct {
		name, loc string
		o         StorageOptions
		want      []string
	}{
		{"bad bucket", "s3://Bad_Bucket/x", StorageOptions{}, []string{"invalid storage location", "Bad_Bucket"}},
		{"endpoint without scheme", "s3://bucket/x", StorageOptions{Endpoint: "127.0.0.1:9000"},
			[]string{"s3://bucket/x", `endpoint "127.0.0.1:9000"`, "want"}},
		{"endpoint with credentials", "s3://bucket/x", StorageOptions{Endpoint: "http://key:hunter2@127.0.0.1:9000"},
			[]string{"s3://bucket/x", "must not hold credentials"}},
		{"unreachable endpoint", "s3://bucket/x", StorageOptions{Endpoint: "http://127.0.0.1:1", PathStyle: true, Region: s3test.Region},
			[]string{"S3 endpoint http://127.0.0.1:1", "s3://bucket/x", "not reachable"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := OpenStorage(ctx, tc.loc, tc.o)
			if err == nil {
				t.Fatal("opened")
			}
			t.Log(err)
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			for _, secret := range []string{"hunter2", s3test.SecretKey} {
				if strings.Contains(err.Error(), secret) {
					t.Errorf("error %q shows a secret", err)
				}
			}
		})
	}
}

// TestLocationOpenS3 opens s3:// locations on a real server, credentials
// from the standard chain (the environment), as the service does.
func TestLocationOpenS3(t *testing.T) {
	env := newS3Env(t, s3test.Options{})
	s3test.UseCredentials(t)
	o := StorageOptions{Endpoint: env.srv.Endpoint, Region: s3test.Region, PathStyle: true}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	t.Run("BucketRoot", func(t *testing.T) { checkSubLocation(t, "s3://"+env.bucket(t), o) })
	t.Run("Prefix", func(t *testing.T) { checkSubLocation(t, "s3://"+env.bucket(t)+"/some/prefix/", o) })
	t.Run("SameAsLocal", func(t *testing.T) {
		// A savepoint location below the checkpoint location, as the
		// service will name one.
		loc := JoinLocation("s3://"+env.bucket(t)+"/ckpt", "counts", "savepoints", "sp-1")
		st, err := OpenStorage(ctx, loc, o)
		if err != nil {
			t.Fatal(err)
		}
		if st.String() != loc {
			t.Errorf("String() = %q, want %q", st.String(), loc)
		}
	})
	t.Run("MissingBucket", func(t *testing.T) {
		_, err := OpenStorage(ctx, "s3://no-such-bucket/x", o)
		if err == nil || !strings.Contains(err.Error(), "bucket no-such-bucket does not exist") || !strings.Contains(err.Error(), env.srv.Endpoint) {
			t.Fatalf("err = %v", err)
		}
		t.Log(err)
	})
	t.Run("WrongCredentials", func(t *testing.T) {
		t.Setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
		_, err := OpenStorage(ctx, "s3://"+env.bucket(t), o)
		if err == nil || strings.Contains(err.Error(), "wrong-secret-value") {
			t.Fatalf("err = %v", err)
		}
		t.Log(err)
	})
	t.Run("ReadOnly", func(t *testing.T) {
		bucket := env.bucket(t)
		rw, err := OpenStorage(ctx, "s3://"+bucket+"/p", o)
		if err != nil {
			t.Fatal(err)
		}
		storagePut(t, rw, "j/x", "x")
		ro := o
		ro.ReadOnly = true
		st, err := OpenStorage(ctx, "s3://"+bucket+"/p", ro)
		if err != nil {
			t.Fatal(err)
		}
		if got := storageRead(t, st, "j/x"); got != "x" {
			t.Fatalf("read %q", got)
		}
		if err := st.Create(ctx, "j/y", []byte("y")); !errors.Is(err, ErrReadOnly) {
			t.Fatalf("create: %v", err)
		}
		if names, err := rw.List(ctx, ""); err != nil || !slices.Equal(names, []string{"j/x"}) {
			t.Fatalf("list = %q, %v", names, err)
		}
	})
}

// Example of the locations a job's savepoints get.
func ExampleJoinLocation() {
	for _, loc := range []string{"/var/lib/sluice/", "./ckpt", "file:///var/lib/sluice", "s3://bucket", "s3://bucket/prefix/"} {
		fmt.Println(JoinLocation(loc, "counts", "savepoints/sp-1"))
	}
	// Output:
	// /var/lib/sluice/counts/savepoints/sp-1
	// ckpt/counts/savepoints/sp-1
	// file:///var/lib/sluice/counts/savepoints/sp-1
	// s3://bucket/counts/savepoints/sp-1
	// s3://bucket/prefix/counts/savepoints/sp-1
}
