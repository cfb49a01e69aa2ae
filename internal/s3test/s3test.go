// Package s3test runs a real S3 server, versitygw with its POSIX backend,
// for tests: on a free port of 127.0.0.1, over a temporary folder, with
// test credentials, stopped with the test.
//
// The server binary is built once per machine by .ci/s3server.sh into the
// user's cache folder. Tests find it through SLUICE_S3_SERVER, else in that
// cache folder. When it is missing, tests are skipped locally and fail in
// CI (CI=true), so CI can never pass without running them.
package s3test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/sluice-stream/sluice/internal/kafkatest"
)

// Version is the versitygw release .ci/s3server.sh builds.
const Version = "v1.8.0"

// EnvServer names the environment variable that gives the path of the
// server binary.
const EnvServer = "SLUICE_S3_SERVER"

// Test credentials and region of every Server. They exist only in the
// server a test starts.
const (
	AccessKey = "sluice-test-access"
	SecretKey = "sluice-test-secret-do-not-use"
	Region    = "us-east-1"
)

// CachedBinary returns where .ci/s3server.sh puts the server binary:
// <user cache dir>/sluice/bin/versitygw-<Version>, the user cache dir
// being $XDG_CACHE_HOME or $HOME/.cache.
func CachedBinary() (string, error) {
	dir, err := os.UserCacheDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(dir, "sluice", "bin", "versitygw-"+Version), nil
}

// Binary returns the path of the server binary: $SLUICE_S3_SERVER if set
// (it must exist), else the cached binary if it exists.
func Binary() (string, error) {
	if p := os.Getenv(EnvServer); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("%s=%s: %w", EnvServer, p, err)
		}
		return p, nil
	}
	p, err := CachedBinary()
	if err != nil {
		return "", fmt.Errorf("no %s and no cache folder: %w", EnvServer, err)
	}
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("no %s set and %s is missing (build it with .ci/s3server.sh)", EnvServer, p)
	}
	return p, nil
}

// RequireBinary returns the server binary's path. If there is none it
// fails the test in CI (environment CI=true) and skips it elsewhere.
func RequireBinary(t testing.TB) string {
	t.Helper()
	p, err := Binary()
	if err == nil {
		return p
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("S3 server binary needed in CI: %v", err)
	}
	t.Skipf("skipping S3 test: %v", err)
	return ""
}

// Options tunes a Server.
type Options struct {
	// PosixFlags are extra flags of versitygw's posix backend, such as
	// "--nometa" (no metadata: the server then ignores conditional writes).
	PosixFlags []string
}

// Server is a running versitygw process.
type Server struct {
	// Endpoint is the server's base URL, "http://127.0.0.1:<port>".
	Endpoint string
	// Addr is the server's host:port.
	Addr string
	// DataDir is the folder the POSIX backend stores buckets in.
	DataDir string

	cmd    *exec.Cmd
	exited chan struct{}
	log    *kafkatest.LogBuffer
}

// Start starts a server for the test (see RequireBinary when there is no
// binary) and stops it when the test ends. It listens on a free port of
// 127.0.0.1 only and stores in a temporary folder.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	bin := RequireBinary(t)
	dataDir := t.TempDir()
	root := filepath.Join(dataDir, "buckets")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	var flags []string
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		s, err := start(bin, root, flags, opts.PosixFlags)
		if err == nil {
			t.Cleanup(func() {
				if err := s.Stop(); err != nil {
					t.Error(err)
				}
				if t.Failed() {
					t.Logf("S3 server output:\n%s", s.log.String())
				}
			})
			s.DataDir = root
			return s
		}
		lastErr = err
		// No extended attributes on this file system (tmpfs on some
		// machines): keep metadata in a sidecar folder instead.
		if strings.Contains(err.Error(), "xattr check failed") && flags == nil {
			side := filepath.Join(dataDir, "meta")
			if err := os.Mkdir(side, 0o755); err != nil {
				t.Fatal(err)
			}
			flags = []string{"--sidecar", side}
		}
	}
	t.Fatalf("start S3 server %s: %v", bin, lastErr)
	return nil
}

// start runs the server on a free port; the port may be taken between
// finding it and the server binding it, in which case the caller retries.
func start(bin, root string, backendFlags, extraFlags []string) (*Server, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	args := []string{"--port", addr, "--region", Region, "--log-level", "silent", "posix"}
	args = append(args, backendFlags...)
	args = append(args, extraFlags...)
	args = append(args, root)
	cmd := exec.Command(bin, args...)
	// Credentials by environment, not on the command line (ps), and
	// nothing else of this environment: versitygw reads many variables
	// (VGW_*, LOGFILE, WEBHOOK...).
	cmd.Env = []string{
		"ROOT_ACCESS_KEY_ID=" + AccessKey,
		"ROOT_SECRET_ACCESS_KEY=" + SecretKey,
		"HOME=" + filepath.Dir(root),
		"PATH=/usr/bin:/bin",
	}
	log := &kafkatest.LogBuffer{}
	cmd.Stdout, cmd.Stderr = log, log
	setDeathSignal(cmd)
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s := &Server{Endpoint: "http://" + addr, Addr: addr, cmd: cmd, exited: make(chan struct{}), log: log}
	go func() {
		_ = cmd.Wait()
		close(s.exited)
	}()
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-s.exited:
			return nil, fmt.Errorf("exited before listening (%v): %s", cmd.ProcessState, log.String())
		default:
		}
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return s, nil
		}
		if time.Now().After(deadline) {
			_ = s.Stop()
			return nil, fmt.Errorf("not listening on %s within 30s: %s", addr, log.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// Stop stops the server (SIGTERM, then SIGKILL after 10s) and waits until
// it exited. Stopping a stopped server does nothing.
func (s *Server) Stop() error {
	select {
	case <-s.exited:
		return nil
	default:
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
		return nil
	case <-time.After(10 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exited
		return errors.New("S3 server did not stop within 10s of SIGTERM; killed")
	}
}

// Credentials returns the server's test credentials.
func (s *Server) Credentials() aws.CredentialsProvider {
	return credentials.NewStaticCredentialsProvider(AccessKey, SecretKey, "")
}

// Client returns an S3 client of the server (path-style addressing).
func (s *Server) Client() *s3.Client {
	return s3.New(s3.Options{
		Region: Region, Credentials: s.Credentials(), BaseEndpoint: aws.String(s.Endpoint), UsePathStyle: true,
		RequestChecksumCalculation: aws.RequestChecksumCalculationWhenRequired,
		ResponseChecksumValidation: aws.ResponseChecksumValidationWhenRequired,
	})
}

// CreateBucket creates a bucket (names are 3 to 63 characters of lower-case
// letters, digits and hyphens).
func (s *Server) CreateBucket(t testing.TB, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := s.Client().CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String(name)}); err != nil {
		t.Fatalf("create bucket %s: %v", name, err)
	}
}

// Log returns what the server printed so far.
func (s *Server) Log() string { return s.log.String() }

// UseCredentials makes the standard AWS credential chain find the test
// server's credentials, and nothing else of this machine's configuration.
func UseCredentials(t *testing.T) {
	t.Setenv("AWS_ACCESS_KEY_ID", AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", SecretKey)
	t.Setenv("AWS_SESSION_TOKEN", "")
	t.Setenv("AWS_PROFILE", "")
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(t.TempDir(), "none"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	t.Setenv("AWS_ENDPOINT_URL", "")
	t.Setenv("AWS_ENDPOINT_URL_S3", "")
}
