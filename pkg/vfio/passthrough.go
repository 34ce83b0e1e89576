package vfio

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Passthrough is an IOMMU group held by vfio drivers, ready to be given to a
// VM as one device. It is named after its selected device (the GPU); the
// group's other functions travel with it.
type Passthrough struct {
	// ID is the address of the selected device, e.g. "0000:65:00.0".
	ID   string
	Role Role
	// Primary is the selected device.
	Primary *Device
	// Functions are every endpoint function of the group, Primary included,
	// sorted by address.
	Functions []*Device
	// Selected are the functions of the group the selector matched, Primary
	// first, sorted by address. More than one when GPUs share a group (a
	// PCIe switch without ACS): VFIO gives a group to one VM whole, so they
	// are one device that carries them all.
	Selected   []*Device
	IOMMUGroup int
}

// Shared reports whether the group carries several selected devices.
func (p *Passthrough) Shared() bool { return len(p.Selected) > 1 }

// NUMANode is the primary function's NUMA node, -1 for none.
func (p *Passthrough) NUMANode() int { return p.Primary.NUMANode }

// Ready reports whether every function of the group is held by a vfio
// driver: only then can the group be opened by a VM.
func (p *Passthrough) Ready() bool {
	for _, f := range p.Functions {
		if !f.BoundToVFIO() {
			return false
		}
	}
	return true
}

// FindPassthrough returns one Passthrough per IOMMU group that holds a
// device sel matches and a vfio driver holds, sorted by ID. A group with
// several selected devices is named after the first by address and lists
// them all in Selected.
func FindPassthrough(devices []*Device, sel Selector) []*Passthrough {
	groups := map[int]*Passthrough{}
	for _, d := range devices {
		role, ok := sel.Match(d)
		if !ok || !d.BoundToVFIO() || d.IOMMUGroup < 0 {
			continue
		}
		if p := groups[d.IOMMUGroup]; p == nil || d.Address < p.ID {
			groups[d.IOMMUGroup] = &Passthrough{ID: d.Address, Role: role, Primary: d, IOMMUGroup: d.IOMMUGroup}
		}
	}
	for _, d := range devices {
		if p := groups[d.IOMMUGroup]; p != nil && !d.IsBridge() {
			p.Functions = append(p.Functions, d)
			if _, ok := sel.Match(d); ok && d.BoundToVFIO() {
				p.Selected = append(p.Selected, d)
			}
		}
	}
	out := make([]*Passthrough, 0, len(groups))
	for _, p := range groups {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b *Passthrough) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// CharDev is a character device's numbers, as sysfs reports them in "dev".
type CharDev struct {
	Major, Minor int64
}

// GroupCharDev reads the numbers of /dev/vfio/<group> from class/vfio.
func (s *Sysfs) GroupCharDev(group int) (CharDev, error) {
	return readCharDev(filepath.Join(s.root, "class", "vfio", strconv.Itoa(group)))
}

// VFIODeviceCharDev reads the numbers of /dev/vfio/devices/<name> from the
// device's vfio-dev directory.
func (s *Sysfs) VFIODeviceCharDev(address, name string) (CharDev, error) {
	return readCharDev(filepath.Join(s.DevicePath(address), "vfio-dev", name))
}

// MiscCharDev reads the numbers of a misc device: "vfio" (/dev/vfio/vfio) or
// "iommu" (/dev/iommu).
func (s *Sysfs) MiscCharDev(name string) (CharDev, error) {
	return readCharDev(filepath.Join(s.root, "class", "misc", name))
}

func readCharDev(dir string) (CharDev, error) {
	v, err := ReadAttr(dir, "dev")
	if err != nil {
		return CharDev{}, err
	}
	maj, min, ok := strings.Cut(v, ":")
	var c CharDev
	var err1, err2 error
	c.Major, err1 = strconv.ParseInt(maj, 10, 64)
	c.Minor, err2 = strconv.ParseInt(min, 10, 64)
	if !ok || err1 != nil || err2 != nil || c.Major <= 0 || c.Minor < 0 {
		return CharDev{}, fmt.Errorf("%s/dev %q: %w", dir, v, ErrSysfs)
	}
	return c, nil
}

// Mode is how a VM opens a passthrough device.
type Mode string

// Modes of VFIO.
const (
	// ModeLegacy opens the group: /dev/vfio/<group>, with /dev/vfio/vfio.
	ModeLegacy Mode = "legacy"
	// ModeIOMMUFD opens each function's cdev: /dev/vfio/devices/vfioN, with
	// /dev/iommu (kernel 6.2 and later).
	ModeIOMMUFD Mode = "iommufd"
)

// Device paths on the node, as a container and the runtime see them.
const (
	ContainerPathVFIO  = "/dev/vfio/vfio"
	ContainerPathIOMMU = "/dev/iommu"
)

// CommonDevicePath is the node every passthrough container needs in mode.
func CommonDevicePath(mode Mode) string {
	if mode == ModeIOMMUFD {
		return ContainerPathIOMMU
	}
	return ContainerPathVFIO
}

// DevicePaths are the nodes that open the group in mode: the group node, or
// the cdev of every function. A function without a cdev cannot be opened in
// iommufd mode, which is an error.
func (p *Passthrough) DevicePaths(mode Mode) ([]string, error) {
	if mode != ModeIOMMUFD {
		return []string{fmt.Sprintf("/dev/vfio/%d", p.IOMMUGroup)}, nil
	}
	paths := make([]string, 0, len(p.Functions))
	for _, f := range p.Functions {
		if f.VFIODevice == "" {
			return nil, fmt.Errorf("device %s of %s has no vfio cdev: %w", f.Address, p.ID, ErrNoCDev)
		}
		paths = append(paths, "/dev/vfio/devices/"+f.VFIODevice)
	}
	return paths, nil
}

// ResolveMode turns a requested mode ("auto", "legacy" or "iommufd") into
// the mode to use: auto is iommufd when the node has <devRoot>/iommu and
// every function of every device has a vfio cdev, legacy otherwise.
func ResolveMode(requested, devRoot string, found []*Passthrough) (Mode, error) {
	switch requested {
	case string(ModeLegacy), string(ModeIOMMUFD):
		return Mode(requested), nil
	case "auto", "":
	default:
		return "", fmt.Errorf("vfio mode %q: want auto, legacy or iommufd", requested)
	}
	if _, err := os.Stat(filepath.Join(devRoot, "iommu")); err != nil {
		return ModeLegacy, nil
	}
	for _, p := range found {
		if _, err := p.DevicePaths(ModeIOMMUFD); err != nil {
			return ModeLegacy, nil
		}
	}
	return ModeIOMMUFD, nil
}
