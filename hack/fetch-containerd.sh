#!/usr/bin/env bash
# Builds the containerd releases whose configuration loading the tests check
# (1.7, 2.0, 2.2 and 2.4; 1.6 is Debian's) from the Go module proxy into
# .cache/containerd/<version>/containerd. Their go.mod files carry replace
# directives, which `go install pkg@version` refuses, so each module is
# built in a writable copy of its source. A release already built is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$PWD/.cache/containerd
for v in 1.7.35 2.0.14 2.2.9 2.4.2; do
  [ -x "$out/$v/containerd" ] && continue
  mod=github.com/containerd/containerd
  [ "${v%%.*}" = 2 ] && mod=$mod/v2
  src=$(go mod download -json "$mod@v$v" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -d "$src" ] || { echo "fetch-containerd: no source for $mod@v$v" >&2; exit 1; }
  tmp=$(mktemp -d)
  cp -r "$src/." "$tmp"
  chmod -R u+w "$tmp"
  echo "fetch-containerd: building containerd $v" >&2
  (cd "$tmp" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -tags "no_btrfs no_devmapper no_zfs no_aufs" \
    -o "$out/$v.tmp/containerd" ./cmd/containerd)
  rm -rf "$tmp" "$out/$v"
  mv "$out/$v.tmp" "$out/$v"
done
