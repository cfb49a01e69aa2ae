package sluicetest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/testcontainers/testcontainers-go"
	"github.com/testcontainers/testcontainers-go/wait"
)

// S3ServerVersion is the versitygw release sluicetest builds when it finds
// no binary.
const S3ServerVersion = "v1.8.0"

// EnvS3Server names the environment variable with the path of a static
// versitygw binary.
const EnvS3Server = "SLUICE_S3_SERVER"

// S3 is the env's S3 store: versitygw with its POSIX backend on a Docker
// volume, with one bucket.
type S3 struct {
	// Endpoint is the store's URL for the containers ("http://s3:7070").
	Endpoint string
	// HostEndpoint is the store's URL from the host.
	HostEndpoint string
	// Bucket is the bucket the processors' checkpoints go to.
	Bucket string
	// Region, AccessKey and SecretKey are the store's test settings; the
	// processors get them as AWS_REGION, AWS_ACCESS_KEY_ID and
	// AWS_SECRET_ACCESS_KEY.
	Region, AccessKey, SecretKey string

	box *box
}

// s3Port is the store's port inside its container.
const s3Port = "7070/tcp"

// startS3 starts the store and creates its bucket.
func (e *Env) startS3(ctx context.Context, t testing.TB) *S3 {
	t.Helper()
	bin, err := S3ServerBinary(ctx, e.opts.S3Server, t.Logf)
	if err != nil {
		t.Fatalf("sluicetest: %v", err)
	}
	img, err := imageOfBinary(ctx, t, bin, "versitygw")
	if err != nil {
		t.Fatalf("sluicetest: S3 server image: %v", err)
	}
	s := &S3{
		Endpoint: "http://s3:7070", Bucket: "sluice", Region: "us-east-1",
		AccessKey: "sluicetest-access", SecretKey: "sluicetest-secret-not-a-secret",
	}
	bx, err := e.run(ctx, t, "s3", testcontainers.ContainerRequest{
		Image:        string(img),
		Cmd:          []string{"--port", ":7070", "--region", s.Region, "posix", "/data"},
		Env:          map[string]string{"ROOT_ACCESS_KEY_ID": s.AccessKey, "ROOT_SECRET_ACCESS_KEY": s.SecretKey},
		ExposedPorts: []string{s3Port},
		Mounts:       testcontainers.Mounts(testcontainers.VolumeMount(e.volume("s3-data"), "/data")),
		WaitingFor:   wait.ForLog("listening on").WithStartupTimeout(time.Minute),
	})
	if err != nil {
		t.Fatalf("sluicetest: S3 server: %v", err)
	}
	s.box = bx
	addr, err := bx.hostAddr(ctx, s3Port)
	if err != nil {
		t.Fatalf("sluicetest: %v", err)
	}
	s.HostEndpoint = "http://" + addr
	if err := s.createBucket(ctx); err != nil {
		bx.dumpLogs(t, 50)
		t.Fatalf("sluicetest: %v", err)
	}
	return s
}

// Client returns an S3 client of the store from the host.
func (s *S3) Client() *s3.Client {
	return s3.New(s3.Options{
		Region: s.Region, BaseEndpoint: aws.String(s.HostEndpoint), UsePathStyle: true,
		Credentials:                credentials.NewStaticCredentialsProvider(s.AccessKey, s.SecretKey, ""),
		RequestChecksumCalculation: aws.RequestChecksumCalculationWhenRequired,
		ResponseChecksumValidation: aws.ResponseChecksumValidationWhenRequired,
	})
}

// createBucket creates s.Bucket, retrying while the server starts.
func (s *S3) createBucket(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		_, err := s.Client().CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String(s.Bucket)})
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("create bucket %s at %s: %w", s.Bucket, s.HostEndpoint, err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Pause freezes the store (docker pause): connections to it stay open but
// get no answer, as with a hung or unreachable store.
func (s *S3) Pause(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.box.pause(ctx); err != nil {
		t.Fatalf("sluicetest: %v", err)
	}
}

// Unpause thaws the store after Pause.
func (s *S3) Unpause(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.box.unpause(ctx); err != nil {
		t.Fatalf("sluicetest: %v", err)
	}
}

// processorEnv is what a processor needs to reach the store: the standard
// AWS variables.
func (s *S3) processorEnv() map[string]string {
	return map[string]string{
		"AWS_ACCESS_KEY_ID":     s.AccessKey,
		"AWS_SECRET_ACCESS_KEY": s.SecretKey,
		"AWS_REGION":            s.Region,
	}
}

// processorArgs are the processor flags for the store.
func (s *S3) processorArgs() []string {
	return []string{"--s3-endpoint", s.Endpoint, "--s3-region", s.Region, "--s3-path-style"}
}

// S3ServerBinary returns the path of a static versitygw binary for the S3
// image: path if set, else $SLUICE_S3_SERVER, else
// <user cache>/sluice/bin/versitygw-<S3ServerVersion>; if that is missing
// too, it builds it there first with `go install` (CGO_ENABLED=0, a few
// minutes, once per machine). logf reports the build.
func S3ServerBinary(ctx context.Context, path string, logf func(format string, args ...any)) (string, error) {
	if path == "" {
		path = os.Getenv(EnvS3Server)
	}
	if path != "" {
		if _, err := os.Stat(path); err != nil {
			return "", fmt.Errorf("S3 server binary: %w", err)
		}
		return path, nil
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("S3 server binary: no %s and no user cache folder: %w", EnvS3Server, err)
	}
	dir := filepath.Join(cache, "sluice", "bin")
	bin := filepath.Join(dir, "versitygw-"+S3ServerVersion)
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	logf("sluicetest: building versitygw %s into %s (once per machine; set %s to use another binary)", S3ServerVersion, dir, EnvS3Server)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	tmp, err := os.MkdirTemp(dir, ".build-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	cmd := exec.CommandContext(ctx, goBin, "install", "github.com/versity/versitygw/cmd/versitygw@"+S3ServerVersion)
	// Outside any module, so the caller's go.mod plays no part.
	cmd.Dir = tmp
	cmd.Env = append(os.Environ(), "GOBIN="+tmp, "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH,
		"GOFLAGS=-buildvcs=false", "GOWORK=off")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build versitygw %s: %w\n%s", S3ServerVersion, err, out)
	}
	// Atomic: a concurrent run never sees a partly written binary.
	if err := os.Rename(filepath.Join(tmp, "versitygw"), bin); err != nil {
		return "", err
	}
	return bin, nil
}
