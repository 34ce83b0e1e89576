#!/usr/bin/env bash
# Cuts NVIDIA's block out of the pci.ids that the pinned go-nvlib embeds, into
# pkg/vfio/pci-nvidia.ids: names of NVIDIA devices come from the same data
# as go-nvlib's without parsing (or paging in) the whole database.
set -euo pipefail
cd "$(dirname "$0")/.."
src="$(go list -m -f '{{.Dir}}' github.com/NVIDIA/go-nvlib)/pkg/pciids/default_pci.ids"
ver="$(go list -m -f '{{.Version}}' github.com/NVIDIA/go-nvlib)"
{
  echo "# NVIDIA's block of pci.ids, cut from the copy that go-nvlib $ver embeds"
  echo "# (github.com/NVIDIA/go-nvlib/pkg/pciids/default_pci.ids), which is"
  echo "# distributed under GPL-2.0-or-later or BSD-3-Clause (see its header)."
  echo "# Regenerate with hack/update-pci-ids.sh when go-nvlib is upgraded."
  grep -m2 -E '^#	(Version|Date):' "$src"
  awk '/^10de  /{on=1; print; next} on && /^[\t#]/{print; next} on{exit}' "$src"
} > pkg/vfio/pci-nvidia.ids
