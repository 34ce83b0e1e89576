#!/usr/bin/env bash
# Fetches the kernel that Debian's linux-image-amd64 depends on, without
# installing it, and keeps what the QEMU tests need in .cache/kernel/<package>:
# vmlinuz, the vfio modules (and pci-stub) and the release. A second run with
# the same package does nothing. .cache/kernel/current points at the result.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.cache/kernel

resolve() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
pkg=$(resolve)
if [ -z "$pkg" ]; then
  apt-get update -qq
  pkg=$(resolve)
fi
[ -n "$pkg" ] || { echo "fetch-kernel: no kernel package behind linux-image-amd64" >&2; exit 1; }
dir="$out/$pkg"
if [ ! -f "$dir/ready" ]; then
  rm -rf "$dir"
  mkdir -p "$dir/modules"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1 && dpkg-deb -x ./*.deb root)
  release=$(ls "$tmp/root/lib/modules")
  cp "$tmp/root/boot/vmlinuz-$release" "$dir/vmlinuz"
  for m in virt/lib/irqbypass drivers/vfio/vfio drivers/vfio/vfio_iommu_type1 drivers/vfio/vfio_virqfd \
           drivers/vfio/pci/vfio-pci-core drivers/vfio/pci/vfio-pci drivers/pci/pci-stub; do
    f="$tmp/root/lib/modules/$release/kernel/$m.ko"
    if [ -f "$f" ]; then cp "$f" "$dir/modules/"; elif [ -f "$f.xz" ]; then xz -dc "$f.xz" > "$dir/modules/$(basename "$m").ko"; fi
  done
  echo "$release" > "$dir/release"
  touch "$dir/ready"
fi
ln -sfn "$pkg" "$out/current"
echo "fetch-kernel: $(cat "$dir/release") in $dir"
