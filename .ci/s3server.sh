#!/usr/bin/env bash
# Builds the S3 server that the S3 storage tests run against (versitygw,
# from the Go module proxy) into the user's cache, once per machine and
# version, and prints the binary's path. The build takes a few minutes the
# first time; afterwards this returns at once.
#
#   export SLUICE_S3_SERVER="$(.ci/s3server.sh)"
#
# Keep VERSION equal to internal/s3test.Version (the tests look for
# versitygw-$VERSION in this cache folder when SLUICE_S3_SERVER is unset).
set -euo pipefail

VERSION=v1.8.0
cache="${XDG_CACHE_HOME:-$HOME/.cache}/sluice/bin"
bin="$cache/versitygw-$VERSION"

if [ ! -x "$bin" ]; then
  echo "building versitygw $VERSION into $cache (once per machine)" >&2
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.build-XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  # Outside any module, so the project's go.mod plays no part.
  (cd "$tmp" && GOBIN="$tmp" CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOWORK=off \
    go install "github.com/versity/versitygw/cmd/versitygw@$VERSION")
  # Atomic: a concurrent run never sees a partly written binary.
  mv -f "$tmp/versitygw" "$bin"
fi
echo "$bin"
