package vfiotest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Device describes one PCI function of a fake node.
type Device struct {
	// Address in sysfs form, e.g. "0000:65:00.0".
	Address         string
	Vendor          uint16
	DeviceID        uint16
	Class           uint32
	SubsystemVendor uint16
	SubsystemDevice uint16
	// Driver holds the device when the tree is built; "" for none.
	Driver string
	// NativeDriver is the driver whose id table matches the device, the one
	// a probe without driver_override picks. Default: Driver.
	NativeDriver string
	// IOMMUGroup is the device's group (ignored on a node without IOMMU).
	IOMMUGroup int
	// NUMANode is written to numa_node; use -1 for none.
	NUMANode int
	// Parent is the address of the upstream bridge; "" puts the device on a
	// root bus.
	Parent string
	// UnbindDelay is how long the driver's remove takes.
	UnbindDelay time.Duration
	// RefuseUnbind makes the driver's remove hang for ever.
	RefuseUnbind bool
	// ProbeError makes every probe of the device by a driver other than a
	// vfio one fail with this errno, as a host driver's does for a device
	// it cannot take (EBUSY when another owner holds its BARs, EIO from a
	// GPU a VM left in a state the driver cannot initialise). A write to
	// drivers/<d>/bind returns it; drivers_probe, as on the kernel, does
	// not, and leaves the device without a driver. 0: probes succeed.
	ProbeError syscall.Errno
	// PhysFn makes the device an SR-IOV virtual function of that physical
	// function: a physfn link here, a virtfnN link there.
	PhysFn string
	// TotalVFs and NumVFs make the device an SR-IOV physical function
	// (sriov_totalvfs, sriov_numvfs): NumVFs of them enabled.
	TotalVFs, NumVFs int
}

// Node describes a whole fake node.
type Node struct {
	Devices []Device
	// Drivers are registered on the PCI bus besides those the devices name
	// (Driver and NativeDriver); list "vfio-pci" to have it loaded.
	Drivers []string
	// NoIOMMU builds a node whose kernel has no IOMMU groups.
	NoIOMMU bool
	// CDev makes vfio drivers expose vfio-dev/vfioN and /dev/vfio/devices/vfioN
	// (kernel 6.2 and later), and the node offer /dev/iommu.
	CDev bool
	// IOMMUFDOnly is a kernel without the group interface (CONFIG_VFIO_GROUP=n,
	// allowed since 6.6): cdevs and /dev/iommu only, no /dev/vfio/<group>, no
	// class/vfio, no /dev/vfio/vfio. It implies CDev.
	IOMMUFDOnly bool
	// CDevWithoutNode gives vfio drivers a vfio-dev/vfioN directory without
	// its dev attribute or node, as Debian's 6.1 kernel has it: no usable cdev.
	CDevWithoutNode bool
	// Modules names a driver's module where the two differ (xhci_hcd is
	// xhci_pci's); by default a driver's module is its name with '-' as '_'.
	Modules map[string]string
	// KernelRelease names lib/modules/<release>. Default: the running kernel's.
	KernelRelease string
	// ModulesAlias is the content of modules.alias. Default: DefaultModulesAlias.
	ModulesAlias string
}

// DefaultModulesAlias is a modules.alias excerpt with the generic vfio-pci
// and the Grace Hopper variant driver, as a 6.8 kernel ships them.
const DefaultModulesAlias = `alias pci:v000010DEd*sv*sd*bc03sc*i* nvidia
alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci
alias vfio_pci:v000010DEd00002342sv*sd*bc*sc*i* nvgrace_gpu_vfio_pci
alias vfio_pci:v000010DEd00002345sv*sd*bc*sc*i* nvgrace_gpu_vfio_pci
alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_vfio_pci
`

// Tree is a fake node on disk: Root/sys, Root/dev, Root/host (the host
// root file system with lib/modules) and Root/proc.
//
// The nvidia driver is modelled where tools look at it: a GPU on "nvidia"
// has /dev/nvidiaN (N its minor, the GPU's place among the node's NVIDIA
// GPUs) and proc/driver/nvidia/gpus/<address>/information naming the minor.
// Root/proc holds the driver's files and, for the processes a test adds
// (AddProcess), links to their /proc/<pid>: a proc root in which only those
// processes run.
type Tree struct {
	Root      string
	SysfsRoot string
	DevRoot   string
	HostRoot  string
	ProcRoot  string
	node      Node
	byAddr    map[string]*Device
}

// Build lays out the node under dir, which must exist.
func Build(dir string, n Node) (*Tree, error) {
	t := &Tree{
		Root:      dir,
		SysfsRoot: filepath.Join(dir, "sys"),
		DevRoot:   filepath.Join(dir, "dev"),
		HostRoot:  filepath.Join(dir, "host"),
		ProcRoot:  filepath.Join(dir, "proc"),
		node:      n,
		byAddr:    map[string]*Device{},
	}
	for i := range t.node.Devices {
		d := &t.node.Devices[i]
		if d.NativeDriver == "" {
			d.NativeDriver = d.Driver
		}
		if _, dup := t.byAddr[d.Address]; dup {
			return nil, fmt.Errorf("vfiotest: device %s listed twice", d.Address)
		}
		t.byAddr[d.Address] = d
	}
	if err := t.build(); err != nil {
		return nil, fmt.Errorf("vfiotest: build %q: %w", dir, err)
	}
	return t, nil
}

func (t *Tree) build() error {
	for _, d := range []string{
		"sys/bus/pci/devices", "sys/bus/pci/drivers", "sys/devices", "sys/module", "sys/class/vfio",
		"dev/vfio", "proc/driver/nvidia/gpus",
	} {
		if err := os.MkdirAll(filepath.Join(t.Root, d), 0o755); err != nil {
			return err
		}
	}
	if !t.node.NoIOMMU {
		if err := os.MkdirAll(filepath.Join(t.SysfsRoot, "kernel", "iommu_groups"), 0o755); err != nil {
			return err
		}
	}
	if err := writeFile(filepath.Join(t.SysfsRoot, "bus/pci/drivers_autoprobe"), "1\n", 0o644); err != nil {
		return err
	}
	if err := mkfifo(filepath.Join(t.SysfsRoot, "bus/pci/drivers_probe")); err != nil {
		return err
	}
	if t.node.IOMMUFDOnly {
		t.node.CDev = true
	}
	misc := map[string]string{"vfio/vfio": "vfio\t10:196"}
	if t.node.IOMMUFDOnly {
		delete(misc, "vfio/vfio")
	}
	if t.node.CDev {
		if err := os.MkdirAll(filepath.Join(t.DevRoot, "vfio/devices"), 0o755); err != nil {
			return err
		}
		misc["iommu"] = "iommu\t10:123"
	}
	for node, class := range misc {
		name, dev, _ := strings.Cut(class, "\t")
		if err := writeFile(filepath.Join(t.DevRoot, node), "", 0o666); err != nil {
			return err
		}
		dir := filepath.Join(t.SysfsRoot, "devices/virtual/misc", name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		if err := writeFile(filepath.Join(dir, "dev"), dev+"\n", 0o444); err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Join(t.SysfsRoot, "class/misc"), 0o755); err != nil {
			return err
		}
		if err := relink(dir, filepath.Join(t.SysfsRoot, "class/misc", name)); err != nil {
			return err
		}
	}
	release := t.KernelRelease()
	alias := t.node.ModulesAlias
	if alias == "" {
		alias = DefaultModulesAlias
	}
	if err := os.MkdirAll(filepath.Join(t.HostRoot, "lib/modules", release), 0o755); err != nil {
		return err
	}
	if err := writeFile(filepath.Join(t.HostRoot, "lib/modules", release, "modules.alias"), alias, 0o644); err != nil {
		return err
	}

	drivers := slices.Clone(t.node.Drivers)
	for _, d := range t.node.Devices {
		drivers = append(drivers, d.Driver, d.NativeDriver)
	}
	slices.Sort(drivers)
	for _, drv := range slices.Compact(drivers) {
		if drv == "" {
			continue
		}
		if err := t.addDriver(drv); err != nil {
			return err
		}
	}
	// Parents first, so that a child's directory lands inside its bridge's.
	pending := slices.Clone(t.node.Devices)
	for len(pending) > 0 {
		var next []Device
		for _, d := range pending {
			if d.Parent != "" {
				if _, ok := t.byAddr[d.Parent]; !ok {
					return fmt.Errorf("device %s: parent %s is not in the node", d.Address, d.Parent)
				}
				if _, err := os.Lstat(t.busLink(d.Parent)); err != nil {
					next = append(next, d)
					continue
				}
			}
			if err := t.addDevice(d); err != nil {
				return fmt.Errorf("device %s: %w", d.Address, err)
			}
		}
		if len(next) == len(pending) {
			return errors.New("devices form a parent cycle")
		}
		pending = next
	}
	return nil
}

// KernelRelease is the release whose lib/modules the tree holds.
func (t *Tree) KernelRelease() string {
	if t.node.KernelRelease != "" {
		return t.node.KernelRelease
	}
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "0.0.0-vfiotest"
	}
	return unix.ByteSliceToString(u.Release[:])
}

func (t *Tree) busLink(addr string) string {
	return filepath.Join(t.SysfsRoot, "bus/pci/devices", addr)
}

func (t *Tree) driverDir(drv string) string {
	return filepath.Join(t.SysfsRoot, "bus/pci/drivers", drv)
}

func (t *Tree) groupDir(group int) string {
	return filepath.Join(t.SysfsRoot, "kernel/iommu_groups", fmt.Sprint(group))
}

// devicePath is where the kernel puts the function: under its bridge, or
// under the root bus pci<domain>:<bus> of its own address.
func (t *Tree) devicePath(d Device) (string, error) {
	if d.Parent != "" {
		parent, err := filepath.EvalSymlinks(t.busLink(d.Parent))
		if err != nil {
			return "", err
		}
		return filepath.Join(parent, d.Address), nil
	}
	return filepath.Join(t.SysfsRoot, "devices", "pci"+d.Address[:7], d.Address), nil
}

func (t *Tree) addDriver(drv string) error {
	dir := t.driverDir(drv)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, f := range []string{"bind", "unbind", "new_id", "remove_id"} {
		if err := mkfifo(filepath.Join(dir, f)); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
	}
	name := t.node.Modules[drv]
	if name == "" {
		name = strings.ReplaceAll(drv, "-", "_")
	}
	mod := filepath.Join(t.SysfsRoot, "module", name)
	if err := os.MkdirAll(filepath.Join(mod, "drivers"), 0o755); err != nil {
		return err
	}
	if err := relink(mod, filepath.Join(dir, "module")); err != nil {
		return err
	}
	return relink(dir, filepath.Join(mod, "drivers", "pci:"+drv))
}

// removeDriver takes a driver off the bus, as unloading its module does.
func (t *Tree) removeDriver(drv string) error {
	dir := t.driverDir(drv)
	if mod, err := filepath.EvalSymlinks(filepath.Join(dir, "module")); err == nil {
		_ = os.Remove(filepath.Join(mod, "drivers", "pci:"+drv))
	}
	return os.RemoveAll(dir)
}

func (t *Tree) addDevice(d Device) error {
	dir, err := t.devicePath(d)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	attrs := map[string]string{
		"vendor":           fmt.Sprintf("0x%04x\n", d.Vendor),
		"device":           fmt.Sprintf("0x%04x\n", d.DeviceID),
		"class":            fmt.Sprintf("0x%06x\n", d.Class),
		"subsystem_vendor": fmt.Sprintf("0x%04x\n", d.SubsystemVendor),
		"subsystem_device": fmt.Sprintf("0x%04x\n", d.SubsystemDevice),
		"numa_node":        fmt.Sprintf("%d\n", d.NUMANode),
		"modalias": fmt.Sprintf("pci:v%08Xd%08Xsv%08Xsd%08Xbc%02Xsc%02Xi%02X\n", d.Vendor, d.DeviceID,
			d.SubsystemVendor, d.SubsystemDevice, d.Class>>16, (d.Class>>8)&0xff, d.Class&0xff),
		"driver_override": "(null)\n",
		"enable":          "1\n",
		"irq":             "0\n",
		"local_cpulist":   "0-1\n",
		"resource":        resource(d),
		"config":          string(config(d)),
	}
	if d.TotalVFs > 0 {
		attrs["sriov_totalvfs"] = fmt.Sprintf("%d\n", d.TotalVFs)
		attrs["sriov_numvfs"] = fmt.Sprintf("%d\n", d.NumVFs)
	}
	for name, v := range attrs {
		if err := writeFile(filepath.Join(dir, name), v, 0o644); err != nil {
			return err
		}
	}
	if err := relink(dir, t.busLink(d.Address)); err != nil {
		return err
	}
	if d.PhysFn != "" {
		pf, err := filepath.EvalSymlinks(t.busLink(d.PhysFn))
		if err != nil {
			return fmt.Errorf("physical function %s: %w", d.PhysFn, err)
		}
		if err := relink(pf, filepath.Join(dir, "physfn")); err != nil {
			return err
		}
		n := 0
		for ; ; n++ {
			if _, err := os.Lstat(filepath.Join(pf, fmt.Sprintf("virtfn%d", n))); err != nil {
				break
			}
		}
		if err := relink(dir, filepath.Join(pf, fmt.Sprintf("virtfn%d", n))); err != nil {
			return err
		}
	}
	if !t.node.NoIOMMU {
		g := filepath.Join(t.groupDir(d.IOMMUGroup), "devices")
		if err := os.MkdirAll(g, 0o755); err != nil {
			return err
		}
		if err := writeFile(filepath.Join(t.groupDir(d.IOMMUGroup), "type"), "DMA\n", 0o644); err != nil {
			return err
		}
		if err := relink(dir, filepath.Join(g, d.Address)); err != nil {
			return err
		}
		if err := relink(t.groupDir(d.IOMMUGroup), filepath.Join(dir, "iommu_group")); err != nil {
			return err
		}
	}
	if d.Driver != "" {
		return t.attach(d.Address, d.Driver)
	}
	return nil
}

// attach does what a successful probe leaves behind, in the kernel's order:
// a vfio driver's probe creates the group and device character nodes, then
// the driver core links device and driver.
func (t *Tree) attach(addr, drv string) error {
	dir, err := filepath.EvalSymlinks(t.busLink(addr))
	if err != nil {
		return err
	}
	if drv == "nvidia" {
		if err := t.addNVIDIA(addr); err != nil {
			return err
		}
	}
	if isVFIO(drv) {
		if err := t.addVFIONodes(dir, t.byAddr[addr].IOMMUGroup); err != nil {
			return err
		}
	}
	if err := relink(dir, filepath.Join(t.driverDir(drv), addr)); err != nil {
		return err
	}
	return relink(t.driverDir(drv), filepath.Join(dir, "driver"))
}

func (t *Tree) addVFIONodes(dir string, group int) error {
	if !t.node.IOMMUFDOnly {
		if err := t.addGroupNode(group); err != nil {
			return err
		}
	}
	if t.node.CDevWithoutNode {
		return os.MkdirAll(filepath.Join(dir, "vfio-dev", "vfio0"), 0o755)
	}
	if !t.node.CDev {
		return nil
	}
	n := 0
	for ; ; n++ {
		if _, err := os.Lstat(filepath.Join(t.DevRoot, "vfio/devices", fmt.Sprintf("vfio%d", n))); err != nil {
			break
		}
	}
	name := fmt.Sprintf("vfio%d", n)
	if err := os.MkdirAll(filepath.Join(dir, "vfio-dev", name), 0o755); err != nil {
		return err
	}
	if err := writeFile(filepath.Join(dir, "vfio-dev", name, "dev"), fmt.Sprintf("%d:%d\n", cdevMajor, n), 0o444); err != nil {
		return err
	}
	return writeFile(filepath.Join(t.DevRoot, "vfio/devices", name), "", 0o600)
}

// addGroupNode creates /dev/vfio/<group> and its class device in sysfs
// (class/vfio/<group>/dev), the minor the lowest free, as the kernel's
// allocator picks it.
func (t *Tree) addGroupNode(group int) error {
	node := filepath.Join(t.DevRoot, "vfio", fmt.Sprint(group))
	if _, err := os.Stat(node); err == nil {
		return nil
	}
	virt := filepath.Join(t.SysfsRoot, "devices/virtual/vfio")
	used := map[string]bool{}
	entries, _ := os.ReadDir(virt)
	for _, e := range entries {
		if b, err := os.ReadFile(filepath.Join(virt, e.Name(), "dev")); err == nil {
			used[strings.TrimSpace(string(b))] = true
		}
	}
	minor := 0
	for used[fmt.Sprintf("%d:%d", groupMajor, minor)] {
		minor++
	}
	dir := filepath.Join(virt, fmt.Sprint(group))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := writeFile(filepath.Join(dir, "dev"), fmt.Sprintf("%d:%d\n", groupMajor, minor), 0o444); err != nil {
		return err
	}
	if err := relink(dir, filepath.Join(t.SysfsRoot, "class/vfio", fmt.Sprint(group))); err != nil {
		return err
	}
	return writeFile(node, "", 0o600)
}

func (t *Tree) removeGroupNode(group int) error {
	_ = os.Remove(filepath.Join(t.SysfsRoot, "class/vfio", fmt.Sprint(group)))
	if err := os.RemoveAll(filepath.Join(t.SysfsRoot, "devices/virtual/vfio", fmt.Sprint(group))); err != nil {
		return err
	}
	return os.Remove(filepath.Join(t.DevRoot, "vfio", fmt.Sprint(group)))
}

// Character device numbers the fake kernel hands out.
const (
	groupMajor = 243 // /dev/vfio/<group>, dynamic on a real kernel
	cdevMajor  = 511 // /dev/vfio/devices/vfioN
)

// detach undoes attach in the kernel's order: the driver link goes first,
// then the driver's remove releases the vfio nodes; the group node goes when
// no vfio driver holds any device of the group any more.
func (t *Tree) detach(addr, drv string) error {
	dir, err := filepath.EvalSymlinks(t.busLink(addr))
	if err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(dir, "driver")); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(t.driverDir(drv), addr)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if drv == "nvidia" {
		return os.RemoveAll(filepath.Join(t.ProcRoot, "driver/nvidia/gpus", addr))
	}
	if !isVFIO(drv) {
		return nil
	}
	if entries, err := os.ReadDir(filepath.Join(dir, "vfio-dev")); err == nil {
		for _, e := range entries {
			_ = os.Remove(filepath.Join(t.DevRoot, "vfio/devices", e.Name()))
		}
	}
	if err := os.RemoveAll(filepath.Join(dir, "vfio-dev")); err != nil {
		return err
	}
	group := t.byAddr[addr].IOMMUGroup
	for _, other := range t.node.Devices {
		if other.IOMMUGroup == group && other.Address != addr && isVFIO(t.driverOf(other.Address)) {
			return nil
		}
	}
	if t.node.IOMMUFDOnly {
		return nil
	}
	return t.removeGroupNode(group)
}

// nvidiaMinor is the GPU's place among the node's NVIDIA GPUs, the minor
// of its /dev/nvidiaN; -1 for a device that is no NVIDIA GPU.
func (t *Tree) nvidiaMinor(addr string) int {
	n := 0
	for _, d := range t.node.Devices {
		if d.Vendor != VendorNVIDIA || d.Class>>16 != 0x03 {
			continue
		}
		if d.Address == addr {
			return n
		}
		n++
	}
	return -1
}

// addNVIDIA is what the nvidia driver's probe of a GPU leaves: its entry
// under /proc/driver/nvidia/gpus and, as nvidia-modprobe makes it,
// /dev/nvidiaN, which stays when the driver lets the GPU go.
func (t *Tree) addNVIDIA(addr string) error {
	minor := t.nvidiaMinor(addr)
	if minor < 0 {
		return nil
	}
	d := t.byAddr[addr]
	dir := filepath.Join(t.ProcRoot, "driver/nvidia/gpus", addr)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	info := fmt.Sprintf("Model: \t\t %04x:%04x\nIRQ:   \t\t 0\nGPU UUID: \t GPU-00000000-0000-0000-0000-%012d\n"+
		"Bus Type: \t PCIe\nBus Location: \t %s\nDevice Minor: \t %d\nGPU Excluded:\t No\n",
		d.Vendor, d.DeviceID, minor, addr, minor)
	if err := writeFile(filepath.Join(dir, "information"), info, 0o444); err != nil {
		return err
	}
	node := t.NVIDIANode(addr)
	if _, err := os.Stat(node); err == nil {
		return nil
	}
	return writeFile(node, "", 0o666)
}

// NVIDIANode is the path of the GPU's /dev/nvidiaN in the tree, "" for a
// device that is no NVIDIA GPU.
func (t *Tree) NVIDIANode(addr string) string {
	minor := t.nvidiaMinor(addr)
	if minor < 0 {
		return ""
	}
	return filepath.Join(t.DevRoot, fmt.Sprintf("nvidia%d", minor))
}

// AddProcess makes a running process visible under the tree's proc root
// (ProcRoot/<pid> links to /proc/<pid>), so that what it holds open is
// what a scan of ProcRoot finds.
func (t *Tree) AddProcess(pid int) error {
	return os.Symlink(fmt.Sprintf("/proc/%d", pid), filepath.Join(t.ProcRoot, strconv.Itoa(pid)))
}

func (t *Tree) driverOf(addr string) string {
	target, err := os.Readlink(filepath.Join(t.busLink(addr), "driver"))
	if err != nil {
		return ""
	}
	return filepath.Base(target)
}

// Driver returns the driver that holds the device now, "" for none.
func (t *Tree) Driver(addr string) string { return t.driverOf(addr) }

// DriverOverride returns the device's driver_override, "" when it reads (null).
func (t *Tree) DriverOverride(addr string) string {
	b, err := os.ReadFile(filepath.Join(t.busLink(addr), "driver_override"))
	if err != nil {
		return ""
	}
	v := strings.TrimSpace(string(b))
	if v == "(null)" {
		return ""
	}
	return v
}

// GroupNode is the path of /dev/vfio/<group> in the tree.
func (t *Tree) GroupNode(group int) string {
	return filepath.Join(t.DevRoot, "vfio", fmt.Sprint(group))
}

// RemoveDevice takes a function out of the node as a hot unplug does: its
// driver lets go, and its sysfs entries disappear.
func (t *Tree) RemoveDevice(addr string) error {
	if drv := t.driverOf(addr); drv != "" {
		if err := t.detach(addr, drv); err != nil {
			return err
		}
	}
	dir, err := filepath.EvalSymlinks(t.busLink(addr))
	if err != nil {
		return err
	}
	d := t.byAddr[addr]
	if !t.node.NoIOMMU {
		_ = os.Remove(filepath.Join(t.groupDir(d.IOMMUGroup), "devices", addr))
	}
	if err := os.Remove(t.busLink(addr)); err != nil {
		return err
	}
	return os.RemoveAll(dir)
}

func isVFIO(drv string) bool {
	return drv == "vfio-pci" || strings.HasSuffix(drv, "_vfio_pci")
}

// relink creates a relative symbolic link at link pointing to target, as
// sysfs does.
func relink(target, link string) error {
	rel, err := filepath.Rel(filepath.Dir(link), target)
	if err != nil {
		return err
	}
	_ = os.Remove(link)
	return os.Symlink(rel, link)
}

func writeFile(path, content string, mode os.FileMode) error {
	return os.WriteFile(path, []byte(content), mode)
}

// mkfifo makes a write-only attribute. A pipe keeps every write, in order,
// however fast writers follow one another, as the kernel's attributes do.
func mkfifo(path string) error {
	if err := unix.Mkfifo(path, 0o200); err != nil {
		return fmt.Errorf("mkfifo %q: %w", path, err)
	}
	return nil
}

// resource lists BAR 0 for display and 3D controllers, as the kernel's
// resource file does (start, end, flags), and empty lines for the rest.
func resource(d Device) string {
	var b strings.Builder
	for i := range 13 {
		if i == 0 && d.Class>>16 == 0x03 {
			b.WriteString("0x00000000c2000000 0x00000000c2ffffff 0x0000000000040200\n")
			continue
		}
		b.WriteString("0x0000000000000000 0x0000000000000000 0x0000000000000000\n")
	}
	return b.String()
}

// config is the start of the device's configuration space.
func config(d Device) []byte {
	c := make([]byte, 64)
	c[0], c[1] = byte(d.Vendor), byte(d.Vendor>>8)
	c[2], c[3] = byte(d.DeviceID), byte(d.DeviceID>>8)
	c[9], c[10], c[11] = byte(d.Class), byte(d.Class>>8), byte(d.Class>>16)
	c[44], c[45] = byte(d.SubsystemVendor), byte(d.SubsystemVendor>>8)
	c[46], c[47] = byte(d.SubsystemDevice), byte(d.SubsystemDevice>>8)
	return c
}
