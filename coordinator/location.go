package coordinator

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"strings"
)

// A location names the root of a Storage in one string, as users give it on
// the command line (--checkpoint-dir) and as savepoints are addressed:
//
//	/var/lib/sluice, ./checkpoints    a local directory (relative to the
//	                                  working directory)
//	file:///var/lib/sluice            the same as a file URL
//	s3://bucket, s3://bucket/prefix   a bucket, or a key prefix in it
//
// OpenStorage opens one; JoinLocation names a folder below one.

// StorageOptions are the settings of OpenStorage that a location does not
// carry. The S3 fields are ignored for local locations. Credentials always
// come from the standard AWS chain (environment, shared config and
// credentials files, SSO, web identity, container and instance roles); they
// are never part of a location or of these options, so neither can leak
// them into logs.
type StorageOptions struct {
	// Endpoint is the base URL of an S3-compatible store (MinIO, versitygw,
	// Ceph...), such as "http://127.0.0.1:9000". Empty means AWS S3.
	Endpoint string
	// Region of the bucket. Empty takes it from the standard AWS
	// configuration (AWS_REGION, shared config file), else "us-east-1".
	Region string
	// PathStyle addresses the bucket in the URL's path
	// (http://host/bucket/key) rather than its host name, as most
	// self-hosted stores need.
	PathStyle bool
	// ReadOnly opens the storage for tools that only read it: a local
	// directory must already exist (it is not created), an S3 store is not
	// probed for conditional writes (so read-only credentials suffice), and
	// Put, Create and Delete of the returned Storage fail with ErrReadOnly.
	ReadOnly bool
}

// ErrReadOnly is returned by the writes of a Storage opened with
// StorageOptions.ReadOnly.
var ErrReadOnly = errors.New("storage: opened read-only")

// ErrBadLocation is wrapped by the errors of ValidateLocation and
// OpenStorage for a location that is not well formed: empty, an unknown
// scheme, a bad S3 bucket name or prefix, a malformed file URL.
var ErrBadLocation = errors.New("invalid storage location")

// location is a parsed location.
type location struct {
	s3      bool
	dir     string // local: the directory, as given (file URLs decoded)
	fileURL bool   // local: given as a file URL, and joined as one
	bucket  string // s3
	prefix  string // s3: "" or without leading and trailing slash
}

// s3URL is the canonical spelling of an s3 location.
func (l location) s3URL() string {
	if l.prefix == "" {
		return "s3://" + l.bucket
	}
	return "s3://" + l.bucket + "/" + l.prefix
}

// ValidateLocation checks the syntax of a location without touching the
// storage: a non-empty local path, a file URL of a local absolute path, or
// s3://bucket[/prefix] with a valid bucket name and prefix. Errors wrap
// ErrBadLocation and quote the location.
func ValidateLocation(loc string) error {
	_, err := parseLocation(loc)
	return err
}

func parseLocation(loc string) (location, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w %q: %s", ErrBadLocation, loc, fmt.Sprintf(format, args...))
	}
	if strings.TrimSpace(loc) == "" {
		return location{}, fmt.Errorf("%w: empty (want a directory, file:///path or s3://bucket/prefix)", ErrBadLocation)
	}
	scheme, rest, isURL := splitScheme(loc)
	if !isURL {
		return location{dir: loc}, nil
	}
	switch strings.ToLower(scheme) {
	case "s3":
		bucket, prefix, err := ParseS3URL("s3:" + rest)
		if err != nil {
			return location{}, fmt.Errorf("%w: %w", ErrBadLocation, err)
		}
		return location{s3: true, bucket: bucket, prefix: prefix}, nil
	case "file":
		u, err := url.Parse("file:" + rest)
		switch {
		case err != nil:
			return location{}, bad("%v", err)
		case u.Opaque != "" || !strings.HasPrefix(u.Path, "/"):
			return location{}, bad("a file URL must hold an absolute path, as in file:///var/lib/sluice (give a relative directory without file:)")
		case u.Host != "" && u.Host != "localhost":
			return location{}, bad("host %q: a file URL names a local directory (file:///path)", u.Host)
		case u.User != nil:
			return location{}, bad("a file URL takes no user")
		case u.RawQuery != "" || u.Fragment != "" || u.ForceQuery:
			return location{}, bad("query strings and fragments are not supported")
		}
		return location{dir: u.Path, fileURL: true}, nil
	}
	return location{}, bad("unknown scheme %q: want a local directory, file:///path or s3://bucket/prefix", scheme)
}

// splitScheme splits "scheme:rest" when loc is a URL: a file: URL, or any
// scheme followed by "://". Anything else, "dir", "./a:b" or "C:\dir"
// included, is a local path.
func splitScheme(loc string) (scheme, rest string, ok bool) {
	i := strings.IndexByte(loc, ':')
	if i <= 0 {
		return "", "", false
	}
	scheme, rest = loc[:i], loc[i+1:]
	for j, c := range scheme {
		letter := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
		if !letter && (j == 0 || !(c >= '0' && c <= '9' || c == '+' || c == '-' || c == '.')) {
			return "", "", false
		}
	}
	if strings.EqualFold(scheme, "file") || strings.HasPrefix(rest, "//") {
		return scheme, rest, true
	}
	return "", "", false
}

// JoinLocation names the folder elem... below location, such that
// OpenStorage(JoinLocation(l, "a/b")) sees, as name "x", the object
// OpenStorage(l) sees as "a/b/x". Elements are slash-separated storage
// names; empty and "." segments are dropped, so leading and trailing
// slashes do not matter. A local location stays a (cleaned) local path,
// relative if it was relative; a file URL stays a file URL; an s3 location
// becomes s3://bucket/prefix/elem. A ".." segment does not name a folder
// below the location: a local path resolves it lexically and OpenStorage
// rejects it in an s3 location. An invalid location is returned unchanged,
// for OpenStorage to report (joining could make it valid: "s3://" + "abc").
func JoinLocation(loc string, elem ...string) string {
	var segs []string
	for _, e := range elem {
		for s := range strings.SplitSeq(e, "/") {
			if s != "" && s != "." {
				segs = append(segs, s)
			}
		}
	}
	if len(segs) == 0 {
		return loc
	}
	rel := strings.Join(segs, "/")
	l, err := parseLocation(loc)
	switch {
	case err != nil:
		return loc
	case l.s3:
		return l.s3URL() + "/" + rel
	case l.fileURL:
		return (&url.URL{Scheme: "file", Path: path.Join(l.dir, rel)}).String()
	default:
		return filepath.Join(l.dir, filepath.FromSlash(rel))
	}
}

// OpenStorage opens the Storage whose root is location: a local directory
// (created if needed, unless o.ReadOnly), a file:// URL of one, or
// s3://bucket/prefix. It fails early with an error naming the location,
// never credentials: a malformed location (wrapping ErrBadLocation), an
// unwritable directory, an unknown or unreachable bucket, a store that does
// not honour conditional writes. ctx bounds the checks only.
func OpenStorage(ctx context.Context, loc string, o StorageOptions) (Storage, error) {
	l, err := parseLocation(loc)
	if err != nil {
		return nil, err
	}
	var st Storage
	if l.s3 {
		st, err = openS3Location(ctx, l, o)
	} else {
		st, err = openLocalLocation(l, o)
	}
	if err != nil {
		return nil, err
	}
	if o.ReadOnly {
		return readOnlyStorage{st}, nil
	}
	return st, nil
}

func openS3Location(ctx context.Context, l location, o StorageOptions) (Storage, error) {
	cfg := DefaultS3Config(l.s3URL())
	cfg.Region = o.Region
	cfg.PathStyle = o.PathStyle
	cfg.CheckConditionalWrites = !o.ReadOnly
	var endpoint string
	if o.Endpoint != "" {
		u, err := url.Parse(o.Endpoint)
		switch {
		case err != nil && strings.Contains(o.Endpoint, "@"):
			// url's errors quote the input, which may hold a password.
			return nil, fmt.Errorf("S3 storage %s: endpoint is not a URL (want one such as http://127.0.0.1:9000)", cfg.URL)
		case err != nil:
			return nil, fmt.Errorf("S3 storage %s: endpoint %q is not a URL (want one such as http://127.0.0.1:9000)", cfg.URL, o.Endpoint)
		case u.User != nil:
			return nil, fmt.Errorf("S3 storage %s: endpoint %s must not hold credentials (they come from the standard AWS chain: AWS_ACCESS_KEY_ID..., ~/.aws, roles)", cfg.URL, u.Redacted())
		case u.Scheme != "http" && u.Scheme != "https" || u.Host == "":
			return nil, fmt.Errorf("S3 storage %s: endpoint %q: want a URL such as http://127.0.0.1:9000", cfg.URL, o.Endpoint)
		}
		cfg.Endpoint = o.Endpoint
		endpoint = u.Redacted()
	}
	s, err := NewS3Storage(ctx, cfg)
	if err != nil {
		if endpoint != "" {
			return nil, fmt.Errorf("S3 endpoint %s: %w", endpoint, err)
		}
		return nil, err
	}
	return s, nil
}

func openLocalLocation(l location, o StorageOptions) (Storage, error) {
	if !o.ReadOnly {
		return NewLocalStorage(l.dir)
	}
	abs, err := filepath.Abs(l.dir)
	if err != nil {
		return nil, fmt.Errorf("checkpoint directory %s: %w", l.dir, err)
	}
	fi, err := os.Stat(abs)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("checkpoint directory %s does not exist", abs)
	case err != nil:
		return nil, fmt.Errorf("checkpoint directory %s: %w", abs, err)
	case !fi.IsDir():
		return nil, fmt.Errorf("checkpoint directory %s is not a directory", abs)
	}
	return &LocalStorage{root: abs}, nil
}

// readOnlyStorage refuses every write to the Storage it wraps.
type readOnlyStorage struct{ Storage }

func (r readOnlyStorage) Put(_ context.Context, name string, _ io.Reader) error {
	return r.refuse("put", name)
}

func (r readOnlyStorage) Create(_ context.Context, name string, _ []byte) error {
	return r.refuse("create", name)
}

func (r readOnlyStorage) Delete(_ context.Context, name string) error {
	return r.refuse("delete", name)
}

func (r readOnlyStorage) refuse(op, name string) error {
	return fmt.Errorf("%s %s in %s: %w", op, name, r.Storage.String(), ErrReadOnly)
}
