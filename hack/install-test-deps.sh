#!/usr/bin/env bash
# Installs what `make test` and `make e2e-cluster` need and a fresh machine
# lacks: Debian's containerd, runc, docker-registry, qemu-system-x86,
# busybox-static and containernetworking-plugins (the cluster test's pod
# network), the pinned oras and crictl CLIs (built with go install into
# .cache/bin), the containerd releases whose configuration loading is
# checked and the cluster test's containerd programs (hack/fetch-containerd.sh,
# into .cache/containerd), and the test kernel (hack/fetch-kernel.sh, into
# .cache/kernel). Kubernetes itself, for make e2e-cluster only, is
# hack/fetch-kubernetes.sh. Each step is skipped when its program is already
# there, so a second run costs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v containerd >/dev/null || need+=(containerd runc)
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
# hack/fetch-kernel.sh unpacks the kernel out of Debian's (xz) bzImage.
command -v xz >/dev/null || need+=(xz-utils)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
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
