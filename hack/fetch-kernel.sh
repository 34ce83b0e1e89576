#!/usr/bin/env bash
# Fetches the kernel that Debian's linux-image-amd64 depends on, without
# installing it, and keeps what the QEMU tests need in .cache/kernel/<package>:
#   vmlinuz    the bzImage as Debian ships it
#   vmlinux    the uncompressed ELF kernel inside it: QEMU boots it through
#              its PVH entry without the decompressor, which under TCG is
#              most of the boot (about 3 s instead of 8)
#   config     the kernel's configuration (what it can do: iommufd or not)
#   modules/   the vfio modules and pci-stub
#   kvm/       kvm, kvm-amd and ccp (kvm-amd needs it): the first guest runs
#              the second one on KVM where the emulated CPU offers SVM
#   release    the kernel release
# A second run with the same package does nothing. .cache/kernel/current
# points at the result.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.cache/kernel
# Bumped whenever the set of files above changes, so that a cache filled by
# an older version of this script is filled again.
layout=2

resolve() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }

le32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }

# extract_vmlinux BZIMAGE OUT: the boot protocol's setup header says where
# the compressed kernel lies (payload_offset and payload_length at 0x248,
# after the (setup_sects+1)*512 bytes of real-mode setup); the payload ends
# with its uncompressed size, which the result must match.
extract_vmlinux() {
  local bz=$1 to=$2 setup start len magic size
  [ "$(dd if="$bz" bs=1 skip=$((0x202)) count=4 2>/dev/null)" = HdrS ] ||
    { echo "fetch-kernel: $bz is not a bzImage" >&2; return 1; }
  setup=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')
  [ "$setup" != 0 ] || setup=4
  start=$(( (setup + 1) * 512 + $(le32 "$bz" $((0x248))) ))
  len=$(le32 "$bz" $((0x24c)))
  magic=$(od -An -tx1 -j "$start" -N4 "$bz" | tr -d ' ')
  # The size trailer would read as the start of a second stream.
  case $magic in
    fd377a58) dec=(xz -dc --single-stream) ;;
    1f8b*)    dec=(gzip -dc) ;;
    28b52ffd) dec=(zstd -dcq) ;;
    *) echo "fetch-kernel: unknown kernel compression (magic $magic)" >&2; return 1 ;;
  esac
  command -v "${dec[0]}" >/dev/null ||
    { echo "fetch-kernel: ${dec[0]} is needed to unpack the kernel (hack/install-test-deps.sh installs it)" >&2; return 1; }
  # Errors show as a wrong size below (head ends tail with SIGPIPE anyway).
  tail -c +$((start + 1)) "$bz" | head -c "$len" | "${dec[@]}" > "$to.tmp" 2>/dev/null || true
  size=$(le32 "$bz" $((start + len - 4)))
  if [ "$(stat -c %s "$to.tmp")" != "$size" ] || [ "$(head -c 4 "$to.tmp" | od -An -tx1 | tr -d ' ')" != 7f454c46 ]; then
    echo "fetch-kernel: the kernel unpacked from $bz is not the $size-byte ELF file its header announces" >&2
    rm -f "$to.tmp"
    return 1
  fi
  mv "$to.tmp" "$to"
}

pkg=$(resolve)
if [ -z "$pkg" ]; then
  apt-get update -qq
  pkg=$(resolve)
fi
[ -n "$pkg" ] || { echo "fetch-kernel: no kernel package behind linux-image-amd64" >&2; exit 1; }
dir="$out/$pkg"
if [ "$(cat "$dir/ready" 2>/dev/null)" != "$layout" ]; then
  rm -rf "$dir"
  mkdir -p "$dir/modules" "$dir/kvm"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1 && dpkg-deb -x ./*.deb root)
  release=$(ls "$tmp/root/lib/modules")
  cp "$tmp/root/boot/vmlinuz-$release" "$dir/vmlinuz"
  cp "$tmp/root/boot/config-$release" "$dir/config"
  extract_vmlinux "$dir/vmlinuz" "$dir/vmlinux"
  take() { # module path, destination directory
    local f="$tmp/root/lib/modules/$release/kernel/$1.ko"
    if [ -f "$f" ]; then cp "$f" "$2/"
    elif [ -f "$f.xz" ]; then xz -dc "$f.xz" > "$2/$(basename "$1").ko"
    else echo "fetch-kernel: $release has no module $1" >&2; return 1
    fi
  }
  for m in virt/lib/irqbypass drivers/vfio/vfio drivers/vfio/vfio_iommu_type1 drivers/vfio/vfio_virqfd \
           drivers/vfio/pci/vfio-pci-core drivers/vfio/pci/vfio-pci drivers/pci/pci-stub; do
    take "$m" "$dir/modules"
  done
  for m in drivers/crypto/ccp/ccp arch/x86/kvm/kvm arch/x86/kvm/kvm-amd; do
    take "$m" "$dir/kvm"
  done
  echo "$release" > "$dir/release"
  echo "$layout" > "$dir/ready"
fi
ln -sfn "$pkg" "$out/current"
echo "fetch-kernel: $(cat "$dir/release") in $dir"
