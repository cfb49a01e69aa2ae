package coordinator

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/ratelimit"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/smithy-go"
)

// ErrCreateConflict is returned by S3Storage.Create when the store kept
// answering 409 ConditionalRequestConflict: another conditional write to the
// same key was in flight each time. Whether an object now exists is unknown
// (it is not ErrExists); the caller treats it like any failed create, and a
// later create or a read of the object settles it.
var ErrCreateConflict = errors.New("storage: conflicting conditional write in progress")

// maxS3PutSize is the largest object one S3 PutObject may write.
const maxS3PutSize = 5 << 30

// putSpoolMemory is how much of a non-seekable Put body is held in memory
// before the rest is spooled to a temporary file.
const putSpoolMemory = 8 << 20

// createConflictRetries is how often Create tries again after a 409
// ConditionalRequestConflict before it gives up with ErrCreateConflict.
const createConflictRetries = 5

// S3Config configures an S3Storage. Use DefaultS3Config to get the safe
// defaults; a zero S3Config skips the conditional-write check.
type S3Config struct {
	// URL is the storage root, "s3://bucket" or "s3://bucket/prefix".
	URL string
	// Endpoint is the base URL of an S3-compatible store (MinIO, versitygw,
	// Ceph...), such as "http://127.0.0.1:9000". Empty means AWS S3 itself.
	// With a custom endpoint the SDK sends and checks request checksums only
	// where the API requires them, since many S3-compatible stores reject
	// the newer default checksum headers.
	Endpoint string
	// Region of the bucket. Empty takes it from the standard configuration
	// (AWS_REGION, shared config file), else "us-east-1".
	Region string
	// PathStyle addresses the bucket in the path (http://host/bucket/key)
	// instead of the host name, as most self-hosted stores need.
	PathStyle bool
	// CheckConditionalWrites makes NewS3Storage verify, with a probe object,
	// that the store honours "If-None-Match: *" on PutObject, and refuse a
	// store that does not: checkpoints complete by create-if-absent, so such
	// a store would let two owners both complete the same checkpoint.
	// DefaultS3Config sets it.
	CheckConditionalWrites bool
	// Credentials, when set, replaces the standard credential chain
	// (environment, shared config and credentials files, SSO, web identity,
	// container and EC2 instance roles). Tests and embedding programs use it.
	Credentials aws.CredentialsProvider
	// RetryMaxAttempts bounds the attempts of one request (the SDK retries
	// throttling, 5xx answers and connection errors with backoff); zero
	// keeps the SDK's default of 3.
	RetryMaxAttempts int
	// RetryMaxBackoff bounds the wait between two attempts; zero keeps the
	// SDK's default of 20s.
	RetryMaxBackoff time.Duration
	// HTTPClient, when set, sends the requests (a custom transport or TLS
	// setup, or a transport whose idle connections the caller closes when
	// done); nil uses the SDK's default client, whose idle connections
	// close after 90s.
	HTTPClient *http.Client
}

// DefaultS3Config returns the configuration for the storage root url with
// the defaults: the standard credential chain and the conditional-write
// check on.
func DefaultS3Config(url string) S3Config {
	return S3Config{URL: url, CheckConditionalWrites: true}
}

// S3Storage is a Storage in an S3 bucket, under an optional key prefix.
// Objects are written with one PutObject each, so a reader sees the old or
// the whole new object; Create is a PutObject with "If-None-Match: *", which
// the store answers 412 Precondition Failed when the key exists, so of two
// racing creates exactly one succeeds.
//
// Objects are limited to S3's single-PUT size of 5 GiB. The credentials
// need s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject on the
// bucket and prefix.
type S3Storage struct {
	client *s3.Client
	bucket string
	prefix string // "" or ending in "/"
	url    string // for String and errors: no credentials, no endpoint secrets
}

var _ Storage = (*S3Storage)(nil)

// ParseS3URL splits "s3://bucket/prefix" into the bucket and the key prefix
// (without leading or trailing slash; empty for the bucket's root). The
// bucket must be a valid S3 bucket name and the prefix a valid object name
// (see ValidateName).
func ParseS3URL(s string) (bucket, prefix string, err error) {
	rest, ok := strings.CutPrefix(s, "s3://")
	if !ok {
		return "", "", fmt.Errorf("S3 URL %q: must start with s3://", s)
	}
	bucket, prefix, _ = strings.Cut(rest, "/")
	if err := validateBucketName(bucket); err != nil {
		return "", "", fmt.Errorf("S3 URL %q: %w", s, err)
	}
	prefix = strings.TrimRight(prefix, "/")
	if prefix != "" {
		if strings.ContainsAny(prefix, "?#") {
			return "", "", fmt.Errorf("S3 URL %q: query strings and fragments are not supported", s)
		}
		if err := ValidateName(prefix); err != nil {
			return "", "", fmt.Errorf("S3 URL %q: prefix: %w", s, err)
		}
	}
	return bucket, prefix, nil
}

// validateBucketName checks the S3 bucket naming rules that matter for
// addressing: 3 to 63 characters of lower-case letters, digits, dots and
// hyphens, starting and ending with a letter or digit.
func validateBucketName(b string) error {
	if len(b) < 3 || len(b) > 63 {
		return fmt.Errorf("bucket name %q must be 3 to 63 characters long", b)
	}
	for i, c := range b {
		alnum := c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
		if !alnum && (c != '.' && c != '-' || i == 0 || i == len(b)-1) {
			return fmt.Errorf("bucket name %q may only hold lower-case letters, digits, dots and hyphens, and start and end with a letter or digit", b)
		}
	}
	if strings.Contains(b, "..") {
		return fmt.Errorf("bucket name %q must not contain \"..\"", b)
	}
	return nil
}

// NewS3Storage connects to the bucket of cfg.URL. It fails early, with an
// error naming the bucket, when the bucket cannot be reached and, if
// cfg.CheckConditionalWrites is set, when the store does not honour
// conditional writes. ctx bounds these checks only.
func NewS3Storage(ctx context.Context, cfg S3Config) (*S3Storage, error) {
	bucket, prefix, err := ParseS3URL(cfg.URL)
	if err != nil {
		return nil, err
	}
	s := &S3Storage{bucket: bucket, url: "s3://" + bucket}
	if prefix != "" {
		s.prefix = prefix + "/"
		s.url += "/" + prefix
	}

	var opts []func(*config.LoadOptions) error
	if cfg.Region != "" {
		opts = append(opts, config.WithRegion(cfg.Region))
	}
	if cfg.Credentials != nil {
		opts = append(opts, config.WithCredentialsProvider(cfg.Credentials))
	}
	if cfg.HTTPClient != nil {
		opts = append(opts, config.WithHTTPClient(cfg.HTTPClient))
	}
	opts = append(opts, config.WithRetryer(func() aws.Retryer {
		return retry.NewStandard(func(o *retry.StandardOptions) {
			// Checkpoint traffic is light; a client-side retry quota
			// would only turn a storage outage into failures that
			// outlast it.
			o.RateLimiter = ratelimit.None
			if cfg.RetryMaxAttempts > 0 {
				o.MaxAttempts = cfg.RetryMaxAttempts
			}
			if cfg.RetryMaxBackoff > 0 {
				o.MaxBackoff = cfg.RetryMaxBackoff
				o.Backoff = retry.NewExponentialJitterBackoff(cfg.RetryMaxBackoff)
			}
		})
	}))
	awsCfg, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("S3 storage %s: load AWS configuration: %w", s.url, err)
	}
	if awsCfg.Region == "" {
		awsCfg.Region = "us-east-1"
	}
	s.client = s3.NewFromConfig(awsCfg, func(o *s3.Options) {
		o.UsePathStyle = cfg.PathStyle
		if cfg.Endpoint != "" {
			o.BaseEndpoint = aws.String(cfg.Endpoint)
			o.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
			o.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired
		}
	})

	if _, err := s.client.HeadBucket(ctx, &s3.HeadBucketInput{Bucket: aws.String(bucket)}); err != nil {
		switch httpStatus(err) {
		case http.StatusNotFound:
			return nil, fmt.Errorf("S3 storage %s: bucket %s does not exist: %w", s.url, bucket, err)
		case http.StatusForbidden:
			return nil, fmt.Errorf("S3 storage %s: access to bucket %s denied (check the credentials and the bucket policy): %w", s.url, bucket, err)
		}
		return nil, fmt.Errorf("S3 storage %s: bucket %s not reachable: %w", s.url, bucket, err)
	}
	if cfg.CheckConditionalWrites {
		if err := s.checkConditionalWrites(ctx); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// checkConditionalWrites creates a probe object with "If-None-Match: *"
// twice: the second create must be refused with 412. The probe's name uses
// the reserved temporary-file prefix, so it can never be an object's name
// and List never shows it.
func (s *S3Storage) checkConditionalWrites(ctx context.Context) error {
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	key := s.prefix + tmpPrefix + "probe-" + hex.EncodeToString(rnd[:])
	refuse := func(why string, err error) error {
		msg := fmt.Sprintf("the S3 store at %s does not honour If-None-Match: * conditional writes; "+
			"Sluice needs them to complete checkpoints safely (probe object s3://%s/%s: %s)", s.url, s.bucket, key, why)
		if err != nil {
			return fmt.Errorf("%s: %w", msg, err)
		}
		return errors.New(msg)
	}
	data := []byte("sluice conditional write probe\n")
	err := s.createKey(ctx, key, data)
	switch {
	case err == nil:
	case ctx.Err() != nil:
		return fmt.Errorf("S3 storage %s: probe write s3://%s/%s: %w", s.url, s.bucket, key, err)
	case httpStatus(err) == http.StatusForbidden:
		return fmt.Errorf("S3 storage %s: cannot write the probe object s3://%s/%s (access denied): %w", s.url, s.bucket, key, err)
	case errors.Is(err, ErrExists):
		return refuse("a create of a new key was answered 412 Precondition Failed", err)
	default:
		if _, ok := errors.AsType[smithy.APIError](err); ok {
			// The store answered, but refused the conditional create
			// (501 Not Implemented, 400 for an unknown header...).
			return refuse("the conditional create was refused", err)
		}
		return fmt.Errorf("S3 storage %s: probe write s3://%s/%s: %w", s.url, s.bucket, key, err)
	}
	err = s.createKey(ctx, key, data)
	var checkErr error
	switch {
	case errors.Is(err, ErrExists):
	case err == nil:
		checkErr = refuse("a second create of the same key succeeded instead of failing with 412 Precondition Failed", nil)
	default:
		checkErr = refuse("a second create of the same key did not fail with 412 Precondition Failed", err)
	}
	if _, err := s.client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(key)}); err != nil && !isNotFound(err) {
		return errors.Join(checkErr, fmt.Errorf("S3 storage %s: cannot delete the probe object s3://%s/%s (Sluice deletes old checkpoints): %w", s.url, s.bucket, key, err))
	}
	return checkErr
}

// String returns the storage root, "s3://bucket/prefix": never credentials
// or the endpoint.
func (s *S3Storage) String() string { return s.url }

// key validates name and returns its object key.
func (s *S3Storage) key(name string) (string, error) {
	if err := ValidateName(name); err != nil {
		return "", err
	}
	return s.prefix + name, nil
}

// where names an object in errors: "s3://bucket/key".
func (s *S3Storage) where(key string) string { return "s3://" + s.bucket + "/" + key }

// Put writes the object with one PutObject, replacing any previous one. A
// seekable r (a file) is sent as it is, from its current position; any
// other reader is first read into memory or, beyond 8 MiB, into a
// temporary file, because a PutObject must know its length up front and be
// able to resend its body on a retry.
func (s *S3Storage) Put(ctx context.Context, name string, r io.Reader) error {
	key, err := s.key(name)
	if err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	body, size, cleanup, err := seekableBody(ctx, r)
	if err != nil {
		return fmt.Errorf("put %s: %w", s.where(key), err)
	}
	defer cleanup()
	if size > maxS3PutSize {
		return fmt.Errorf("put %s: %d bytes is more than the 5 GiB S3 allows in one PutObject", s.where(key), size)
	}
	_, err = s.client.PutObject(ctx, &s3.PutObjectInput{
		Bucket: aws.String(s.bucket), Key: aws.String(key), Body: body, ContentLength: aws.Int64(size),
	})
	if err != nil {
		return fmt.Errorf("put %s: %w", s.where(key), err)
	}
	return nil
}

// seekableBody returns r as a ReadSeeker positioned at r's current position
// and the number of bytes from there to its end.
func seekableBody(ctx context.Context, r io.Reader) (body io.ReadSeeker, size int64, cleanup func(), err error) {
	noop := func() {}
	if rs, ok := r.(io.ReadSeeker); ok {
		start, err := rs.Seek(0, io.SeekCurrent)
		if err == nil {
			var end int64
			if end, err = rs.Seek(0, io.SeekEnd); err == nil {
				_, err = rs.Seek(start, io.SeekStart)
			}
			if err == nil {
				// The SDK rewinds to where the body started.
				return io.NewSectionReader(readerAtSeeker{rs}, start, end-start), end - start, noop, nil
			}
		}
		// Not seekable after all (a pipe behind an *os.File): copy.
	}
	var head bytes.Buffer
	n, err := io.Copy(&head, io.LimitReader(ctxReader{ctx, r}, putSpoolMemory+1))
	if err != nil {
		return nil, 0, noop, err
	}
	if n <= putSpoolMemory {
		return bytes.NewReader(head.Bytes()), n, noop, nil
	}
	f, err := os.CreateTemp("", tmpPrefix+"s3-put-*")
	if err != nil {
		return nil, 0, noop, err
	}
	cleanup = func() {
		f.Close()
		os.Remove(f.Name())
	}
	if _, err = f.Write(head.Bytes()); err == nil {
		_, err = io.Copy(f, ctxReader{ctx, r})
	}
	if err == nil {
		size, err = f.Seek(0, io.SeekCurrent)
	}
	if err == nil {
		_, err = f.Seek(0, io.SeekStart)
	}
	if err != nil {
		cleanup()
		return nil, 0, noop, err
	}
	return f, size, cleanup, nil
}

// readerAtSeeker reads at an offset by seeking; an io.SectionReader over it
// is only read by one goroutine at a time (the SDK's request), which makes
// that safe. Files are used through their own ReadAt.
type readerAtSeeker struct{ rs io.ReadSeeker }

func (r readerAtSeeker) ReadAt(p []byte, off int64) (int, error) {
	if ra, ok := r.rs.(io.ReaderAt); ok {
		return ra.ReadAt(p, off)
	}
	if _, err := r.rs.Seek(off, io.SeekStart); err != nil {
		return 0, err
	}
	return io.ReadFull(r.rs, p)
}

// Create writes the object with "If-None-Match: *": the store refuses it
// with 412 Precondition Failed, reported as ErrExists, if the key exists.
// A 409 ConditionalRequestConflict (another conditional write to the key in
// flight) is retried a few times; if it persists, the error wraps
// ErrCreateConflict. Like any request, a create whose answer is lost is
// retried by the SDK; the retry then finds the first attempt's object and
// reports ErrExists, which the caller resolves by reading it back.
func (s *S3Storage) Create(ctx context.Context, name string, data []byte) error {
	key, err := s.key(name)
	if err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := s.createKey(ctx, key, data); err != nil {
		return fmt.Errorf("create %s: %w", s.where(key), err)
	}
	return nil
}

func (s *S3Storage) createKey(ctx context.Context, key string, data []byte) error {
	backoff := 20 * time.Millisecond
	for attempt := 0; ; attempt++ {
		_, err := s.client.PutObject(ctx, &s3.PutObjectInput{
			Bucket: aws.String(s.bucket), Key: aws.String(key), Body: bytes.NewReader(data),
			ContentLength: aws.Int64(int64(len(data))), IfNoneMatch: aws.String("*"),
		})
		switch {
		case err == nil:
			return nil
		case isPreconditionFailed(err):
			return ErrExists
		case !isConditionalConflict(err):
			return err
		case attempt == createConflictRetries:
			return fmt.Errorf("%w: %d attempts answered 409: %w", ErrCreateConflict, attempt+1, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: %w", ctx.Err(), err)
		case <-time.After(backoff):
		}
		backoff *= 2
	}
}

// Get opens the object for reading; ErrNotFound if it does not exist.
func (s *S3Storage) Get(ctx context.Context, name string) (io.ReadCloser, error) {
	key, err := s.key(name)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	out, err := s.client.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(key)})
	if isNotFound(err) {
		return nil, fmt.Errorf("get %s: %w", s.where(key), ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", s.where(key), err)
	}
	return out.Body, nil
}

// List returns the names of the objects whose name starts with prefix,
// sorted, going through every page of ListObjectsV2.
func (s *S3Storage) List(ctx context.Context, prefix string) ([]string, error) {
	if i := strings.LastIndex(prefix, "/"); i >= 0 {
		if err := ValidateName(prefix[:i]); err != nil {
			return nil, fmt.Errorf("list %q: %w", prefix, err)
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var names []string
	p := s3.NewListObjectsV2Paginator(s.client, &s3.ListObjectsV2Input{
		Bucket: aws.String(s.bucket), Prefix: aws.String(s.prefix + prefix),
	})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return nil, fmt.Errorf("list %s: %w", s.where(s.prefix+prefix), err)
		}
		for _, o := range page.Contents {
			name, ok := strings.CutPrefix(aws.ToString(o.Key), s.prefix)
			// Folder markers ("a/") and probes or other reserved names
			// are not objects.
			if ok && ValidateName(name) == nil {
				names = append(names, name)
			}
		}
	}
	// S3 lists in UTF-8 byte order, which is string order; some
	// compatible stores do not.
	slices.Sort(names)
	return names, nil
}

// Delete removes the object; deleting a missing object is not an error.
func (s *S3Storage) Delete(ctx context.Context, name string) error {
	key, err := s.key(name)
	if err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	_, err = s.client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(key)})
	if err != nil && !isNotFound(err) {
		return fmt.Errorf("delete %s: %w", s.where(key), err)
	}
	return nil
}

// httpStatus returns the HTTP status of an S3 error answer, 0 if err is not
// one.
func httpStatus(err error) int {
	if re, ok := errors.AsType[interface {
		error
		HTTPStatusCode() int
	}](err); ok {
		return re.HTTPStatusCode()
	}
	return 0
}

func apiErrorCode(err error) string {
	if ae, ok := errors.AsType[smithy.APIError](err); ok {
		return ae.ErrorCode()
	}
	return ""
}

func isNotFound(err error) bool {
	if err == nil {
		return false
	}
	switch apiErrorCode(err) {
	case "NoSuchKey", "NotFound":
		return true
	}
	return httpStatus(err) == http.StatusNotFound && apiErrorCode(err) != "NoSuchBucket"
}

func isPreconditionFailed(err error) bool {
	return apiErrorCode(err) == "PreconditionFailed" || httpStatus(err) == http.StatusPreconditionFailed
}

// isConditionalConflict: 409 ConditionalRequestConflict, not other 409s
// such as a key that is a folder on a file-system backed store.
func isConditionalConflict(err error) bool {
	return apiErrorCode(err) == "ConditionalRequestConflict"
}
