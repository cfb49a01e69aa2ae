package sluicetest

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/moby/moby/client"
	"github.com/testcontainers/testcontainers-go"
)

// Image is a container image the tests built, as a reference (repo:tag)
// that Docker resolves locally.
type Image string

// imageRepoPrefix starts the repository name of every image sluicetest
// builds: sluicetest/<name>:<hash>.
const imageRepoPrefix = "sluicetest/"

// builtImages caches BuildImage within one test process, by package:
// the binary is built (and hashed) once per process.
var builtImages sync.Map // package path → Image

// BuildImage builds the Go main package pkg into a static binary
// (CGO_ENABLED=0, GOOS=linux) and returns an image FROM scratch around it,
// whose entrypoint is the binary. pkg is what `go build` takes, resolved in
// the test's working directory (its package folder): an import path such as
// "github.com/acme/clicks/cmd/job", or a relative path such as
// "../cmd/job". The image is tagged with a hash of the binary, so an image
// of the same binary, from an earlier run too, is reused without a build;
// images are not removed when the test ends (only a new build removes the
// images of the same name beyond the newest 3).
//
// The image holds only the binary and an empty /tmp: no shell, no CA
// certificates, no time zone data (embed them in the binary with
// time/tzdata and x509 roots if the job needs them).
func BuildImage(t testing.TB, pkg string) Image {
	t.Helper()
	if img, ok := builtImages.Load(pkg); ok {
		return img.(Image)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	dir := t.TempDir()
	bin := filepath.Join(dir, "app")
	if err := goBuild(ctx, pkg, bin); err != nil {
		t.Fatalf("sluicetest: %v", err)
	}
	img, err := imageOfBinary(ctx, t, bin, path.Base(strings.TrimSuffix(pkg, "/")))
	if err != nil {
		t.Fatalf("sluicetest: image of %s: %v", pkg, err)
	}
	builtImages.Store(pkg, img)
	return img
}

// goBuild builds pkg as a static Linux binary at out. -trimpath and
// -buildvcs=false keep the binary independent of the checkout's folder and
// commit, so its hash (the image tag) changes only when the code does.
func goBuild(ctx context.Context, pkg, out string) error {
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	cmd := exec.CommandContext(ctx, goBin, "build", "-trimpath", "-buildvcs=false", "-o", out, pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", pkg, err, b)
	}
	return nil
}

// imageOfBinary returns the image sluicetest/<name>:<hash of bin>, building
// it FROM scratch around bin if Docker does not have it yet.
func imageOfBinary(ctx context.Context, t testing.TB, bin, name string) (Image, error) {
	f, err := os.Open(bin)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hash %s: %w", bin, err)
	}
	repo := imageRepoPrefix + imageName(name)
	tag := hex.EncodeToString(h.Sum(nil))[:20]
	ref := Image(repo + ":" + tag)

	cli, err := dockerClient(ctx)
	if err != nil {
		return "", err
	}
	defer cli.Close()
	if _, err := cli.ImageInspect(ctx, string(ref)); err == nil {
		return ref, nil // built before, by this or an earlier run
	}

	archive, err := buildContext(bin)
	if err != nil {
		return "", err
	}
	provider, err := testcontainers.NewDockerProvider()
	if err != nil {
		return "", fmt.Errorf("docker provider: %w", err)
	}
	defer provider.Close()
	var buildLog bytes.Buffer
	_, err = provider.BuildImage(ctx, &testcontainers.ContainerRequest{FromDockerfile: testcontainers.FromDockerfile{
		ContextArchive: archive,
		Repo:           repo,
		Tag:            tag,
		KeepImage:      true,
		BuildLogWriter: &buildLog,
	}})
	if err != nil {
		return "", fmt.Errorf("docker build %s: %w\n%s", ref, err, buildLog.String())
	}
	t.Logf("sluicetest: built image %s", ref)
	pruneImages(ctx, t, cli, repo, keepImages)
	return ref, nil
}

// keepImages is how many images of one repository (the newest) survive a
// new build: the images of the versions a checkout switches between stay
// cached, and the disk does not fill up with one image per code change.
const keepImages = 3

// pruneImages removes the images of repo beyond the newest keep. Failures
// (an image in use by a container, say) are only logged.
func pruneImages(ctx context.Context, t testing.TB, cli *testcontainers.DockerClient, repo string, keep int) {
	res, err := cli.ImageList(ctx, client.ImageListOptions{Filters: make(client.Filters).Add("reference", repo)})
	if err != nil {
		t.Logf("sluicetest: list images of %s: %v", repo, err)
		return
	}
	imgs := res.Items
	sort.Slice(imgs, func(i, j int) bool { return imgs[i].Created > imgs[j].Created })
	for _, img := range imgs[min(keep, len(imgs)):] {
		if _, err := cli.ImageRemove(ctx, img.ID, client.ImageRemoveOptions{PruneChildren: true}); err != nil {
			t.Logf("sluicetest: remove old image %v: %v", img.RepoTags, err)
		}
	}
}

// dockerfile is the whole recipe of every image: a static binary and an
// empty /tmp (Go's os.TempDir) on nothing.
const dockerfile = `FROM scratch
COPY tmp /tmp
COPY app /app
ENTRYPOINT ["/app"]
`

// buildContext returns the docker build context: the Dockerfile (first, as
// testcontainers reads it from the archive), the binary as /app, /tmp.
func buildContext(bin string) (io.ReadSeeker, error) {
	data, err := os.ReadFile(bin)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	now := time.Unix(0, 0)
	files := []struct {
		hdr  tar.Header
		data []byte
	}{
		{tar.Header{Name: "Dockerfile", Mode: 0o644, Size: int64(len(dockerfile)), ModTime: now}, []byte(dockerfile)},
		{tar.Header{Name: "tmp/", Typeflag: tar.TypeDir, Mode: 0o1777, ModTime: now}, nil},
		{tar.Header{Name: "app", Mode: 0o755, Size: int64(len(data)), ModTime: now}, data},
	}
	for _, f := range files {
		if err := tw.WriteHeader(&f.hdr); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return bytes.NewReader(buf.Bytes()), nil
}

var notImageName = regexp.MustCompile(`[^a-z0-9._-]+`)

// imageName makes s a valid image repository component.
func imageName(s string) string {
	s = notImageName.ReplaceAllString(strings.ToLower(s), "-")
	s = strings.Trim(s, ".-_")
	if s == "" || s == "." {
		return "app"
	}
	return s
}
