#!/usr/bin/env bash
# Runs a Go tool at the version the project pins, installing it into
# .cache/bin on first use: hack/tool.sh NAME [ARGS...]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
name="$1"; shift
case "$name" in
  staticcheck) pkg=honnef.co/go/tools/cmd/staticcheck@v0.8.2 ;;
  oras)        pkg=oras.land/oras/cmd/oras@v1.3.6 ;;
  crictl)      pkg=sigs.k8s.io/cri-tools/cmd/crictl@v1.37.0 ;;
  *) echo "hack/tool.sh: unknown tool $name" >&2; exit 2 ;;
esac
bin="$root/.cache/bin"
ver="${pkg##*@}"
if [ ! -x "$bin/$name" ] || [ "$(cat "$bin/.$name.version" 2>/dev/null)" != "$ver" ]; then
  mkdir -p "$bin"
  GOBIN="$bin" GOWORK=off go install "$pkg"
  echo "$ver" > "$bin/.$name.version"
fi
exec "$bin/$name" "$@"
