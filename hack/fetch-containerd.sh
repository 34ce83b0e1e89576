#!/usr/bin/env bash
# Builds the containerd releases whose configuration loading the tests check
# (1.7, 2.0, 2.2 and 2.4; 1.6 is Debian's) from the Go module proxy into
# .cache/containerd/<version>/containerd, and for the release the cluster
# test runs pods on (2.4) its runc shim, containerd-shim-runc-v2, and ctr
# beside it.
# Their go.mod files carry replace directives, which `go install
# pkg@version` refuses, so each module is built in a writable copy of its
# source. A program already built is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$PWD/.cache/containerd

# build VERSION PROGRAM...: the programs (cmd/<name>) of one release.
build() {
  local v=$1; shift
  local mod=github.com/containerd/containerd
  [ "${v%%.*}" = 2 ] && mod=$mod/v2
  local src
  src=$(go mod download -json "$mod@v$v" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -d "$src" ] || { echo "fetch-containerd: no source for $mod@v$v" >&2; exit 1; }
  local tmp
  tmp=$(mktemp -d)
  cp -r "$src/." "$tmp"
  chmod -R u+w "$tmp"
  mkdir -p "$out/$v.tmp"
  for p in "$@"; do
    echo "fetch-containerd: building $p $v" >&2
    (cd "$tmp" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -tags "no_btrfs no_devmapper no_zfs no_aufs" \
      -o "$out/$v.tmp/$p" "./cmd/$p")
  done
  rm -rf "$tmp"
  mkdir -p "$out/$v"
  mv "$out/$v.tmp/"* "$out/$v/"
  rmdir "$out/$v.tmp"
}

for v in 1.7.35 2.0.14 2.2.9 2.4.2; do
  [ -x "$out/$v/containerd" ] || build "$v" containerd
done
[ -x "$out/2.4.2/containerd-shim-runc-v2" ] && [ -x "$out/2.4.2/ctr" ] || build 2.4.2 containerd-shim-runc-v2 ctr
