#!/usr/bin/env bash
# Installs what `make test` needs and a fresh machine lacks: Debian's
# containerd, runc, docker-registry, qemu-system-x86 and busybox-static, the
# pinned oras and crictl CLIs (built with go install into .cache/bin), the
# containerd releases whose configuration loading is checked
# (hack/fetch-containerd.sh, into .cache/containerd), and the test kernel
# (hack/fetch-kernel.sh, into .cache/kernel). Each step is skipped when its
# program is already there, so a second run costs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v containerd >/dev/null || need+=(containerd runc)
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-test-deps: need root to install ${need[*]} (apt-get)" >&2
    exit 1
  fi
  echo "install-test-deps: installing ${need[*]} from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
hack/tool.sh oras version >/dev/null
hack/tool.sh crictl --version >/dev/null
hack/fetch-containerd.sh
hack/fetch-kernel.sh >/dev/null
