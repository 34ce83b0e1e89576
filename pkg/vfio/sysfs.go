package vfio

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultSysfsRoot is where the kernel mounts sysfs.
const DefaultSysfsRoot = "/sys"

// Sysfs reads PCI devices and IOMMU groups below a sysfs root. It is the
// package's only reader of sysfs; it caches nothing, so every call sees the
// kernel's current state.
type Sysfs struct {
	root string
}

// NewSysfs returns a reader for the sysfs tree mounted at root
// (DefaultSysfsRoot on a node, a fake tree in tests).
func NewSysfs(root string) *Sysfs {
	return &Sysfs{root: root}
}

// Root is the sysfs root this reader was built with.
func (s *Sysfs) Root() string { return s.root }

func (s *Sysfs) devicesDir() string { return filepath.Join(s.root, "bus", "pci", "devices") }

// DevicePath is the device's directory under bus/pci/devices.
func (s *Sysfs) DevicePath(address string) string {
	return filepath.Join(s.devicesDir(), address)
}

// DriverPath is a driver's directory under bus/pci/drivers.
func (s *Sysfs) DriverPath(driver string) string {
	return filepath.Join(s.root, "bus", "pci", "drivers", driver)
}

// DriverLoaded reports whether the driver is registered on the PCI bus.
func (s *Sysfs) DriverLoaded(driver string) bool {
	_, err := os.Stat(s.DriverPath(driver))
	return err == nil
}

// Devices reads every PCI function, sorted by address. A function whose
// identity cannot be read is left out and its error joined into the returned
// error; the others are still returned.
func (s *Sysfs) Devices() ([]*Device, error) {
	entries, err := os.ReadDir(s.devicesDir())
	if err != nil {
		return nil, fmt.Errorf("list PCI devices in %q: %w", s.devicesDir(), err)
	}
	devices := make([]*Device, 0, len(entries))
	var errs []error
	for _, e := range entries {
		d, err := s.Device(e.Name())
		if err != nil {
			errs = append(errs, err)
			continue
		}
		devices = append(devices, d)
	}
	slices.SortFunc(devices, func(a, b *Device) int { return strings.Compare(a.Address, b.Address) })
	return devices, errors.Join(errs...)
}

// Device reads one PCI function. Its ids and class must be readable; the
// other attributes fall back to "none" when the kernel does not expose them.
func (s *Sysfs) Device(address string) (*Device, error) {
	dir := s.DevicePath(address)
	d := &Device{Address: address, IOMMUGroup: -1, NUMANode: -1}
	var err error
	if d.Vendor, err = readUint16(dir, "vendor"); err != nil {
		if _, serr := os.Stat(dir); errors.Is(serr, fs.ErrNotExist) {
			return nil, fmt.Errorf("read PCI device %s: %w", address, ErrDeviceNotFound)
		}
		return nil, fmt.Errorf("read PCI device %s: %w", address, err)
	}
	if d.DeviceID, err = readUint16(dir, "device"); err != nil {
		return nil, fmt.Errorf("read PCI device %s: %w", address, err)
	}
	class, err := readHex(dir, "class", 32)
	if err != nil {
		return nil, fmt.Errorf("read PCI device %s: %w", address, err)
	}
	d.Class = uint32(class)
	// Some virtual platforms omit the subsystem ids; zero is the kernel's own default.
	d.SubsystemVendor, _ = readUint16(dir, "subsystem_vendor")
	d.SubsystemDevice, _ = readUint16(dir, "subsystem_device")

	if d.Driver, err = linkBase(dir, "driver"); err != nil {
		return nil, fmt.Errorf("read PCI device %s: %w", address, err)
	}
	if v, err := ReadAttr(dir, "driver_override"); err == nil && v != "(null)" {
		d.DriverOverride = v
	}
	group, err := linkBase(dir, "iommu_group")
	if err != nil {
		return nil, fmt.Errorf("read PCI device %s: %w", address, err)
	}
	if group != "" {
		if d.IOMMUGroup, err = strconv.Atoi(group); err != nil {
			return nil, fmt.Errorf("read PCI device %s: iommu_group %q: %w", address, group, ErrSysfs)
		}
	}
	if v, err := ReadAttr(dir, "numa_node"); err == nil {
		if n, err := strconv.Atoi(v); err == nil && n >= 0 {
			d.NUMANode = n
		}
	}
	if d.Modalias, err = ReadAttr(dir, "modalias"); err != nil {
		d.Modalias = modalias(d)
	}
	if entries, err := os.ReadDir(filepath.Join(dir, "vfio-dev")); err == nil {
		for _, e := range entries {
			// A cdev without its dev attribute (Debian's 6.1) has no node.
			if _, err := os.Stat(filepath.Join(dir, "vfio-dev", e.Name(), "dev")); err == nil && strings.HasPrefix(e.Name(), "vfio") {
				d.VFIODevice = e.Name()
				break
			}
		}
	}
	if d.PhysFn, err = linkBase(dir, "physfn"); err != nil {
		return nil, fmt.Errorf("read PCI device %s: %w", address, err)
	}
	if v, err := ReadAttr(dir, "sriov_totalvfs"); err == nil {
		d.TotalVFs, _ = strconv.Atoi(v)
	}
	if v, err := ReadAttr(dir, "sriov_numvfs"); err == nil {
		d.NumVFs, _ = strconv.Atoi(v)
	}
	d.Path = dir
	// bus/pci/devices/<address> links to the device's place in the tree,
	// relatively; a tree that holds the directory itself has no place.
	if target, err := os.Readlink(dir); err == nil {
		if !filepath.IsAbs(target) {
			target = filepath.Join(filepath.Dir(dir), target)
		}
		d.Path = target
	}
	if parent := filepath.Base(filepath.Dir(d.Path)); addressPattern.MatchString(parent) {
		d.Parent = parent
	}
	return d, nil
}

// GroupReady reports whether the kernel has made the group openable
// through the group interface: class/vfio/<group> (and with it
// /dev/vfio/<group>) exists. Kernels without that interface
// (CONFIG_VFIO_GROUP=n) never make it.
func (s *Sysfs) GroupReady(group int) bool {
	_, err := os.Stat(filepath.Join(s.root, "class", "vfio", strconv.Itoa(group)))
	return err == nil
}

// IOMMUGroupCount is the number of IOMMU groups the kernel created: zero when
// the IOMMU is off or absent.
func (s *Sysfs) IOMMUGroupCount() (int, error) {
	dir := filepath.Join(s.root, "kernel", "iommu_groups")
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("list IOMMU groups in %q: %w", dir, err)
	}
	return len(entries), nil
}

// ReadAttr returns a sysfs attribute with surrounding white space removed.
// Attributes are small: one read into a stack buffer, with no stat and no
// poller, keeps a scan of a big node to a few system calls per file.
func ReadAttr(dir, name string) (string, error) {
	path := filepath.Join(dir, name)
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("read %s: %w", name, &fs.PathError{Op: "open", Path: path, Err: err})
	}
	var buf [256]byte
	n, err := unix.Read(fd, buf[:])
	unix.Close(fd)
	if err != nil {
		return "", fmt.Errorf("read %s: %w", name, &fs.PathError{Op: "read", Path: path, Err: err})
	}
	return strings.TrimSpace(string(buf[:max(n, 0)])), nil
}

func readHex(dir, name string, bits int) (uint64, error) {
	s, err := ReadAttr(dir, name)
	if err != nil {
		return 0, err
	}
	v, err := strconv.ParseUint(strings.TrimPrefix(s, "0x"), 16, bits)
	if err != nil {
		return 0, fmt.Errorf("%s %q: %w", name, s, ErrSysfs)
	}
	return v, nil
}

func readUint16(dir, name string) (uint16, error) {
	v, err := readHex(dir, name, 16)
	return uint16(v), err
}

// linkBase is the last element of a symbolic link's target, "" when the link
// does not exist.
func linkBase(dir, name string) (string, error) {
	base, err := ReadLinkBase(filepath.Join(dir, name))
	if err != nil {
		return "", fmt.Errorf("read link %s: %w", name, err)
	}
	return base, nil
}

// ReadLinkBase returns the last element of the target of the symbolic link
// at path, as the driver link of a device names its driver ("vfio-pci"),
// or "" when there is no link. Like ReadAttr, it reads into a stack buffer:
// the device plugin checks every device's driver links four times a
// second.
func ReadLinkBase(path string) (string, error) {
	var buf [256]byte
	n, err := unix.Readlink(path, buf[:])
	switch {
	case errors.Is(err, unix.ENOENT):
		return "", nil
	case err != nil:
		return "", &fs.PathError{Op: "readlink", Path: path, Err: err}
	case n == len(buf): // perhaps cut short: ask the long way
		target, err := os.Readlink(path)
		if errors.Is(err, fs.ErrNotExist) {
			return "", nil
		}
		if err != nil {
			return "", err
		}
		return filepath.Base(target), nil
	}
	target := buf[:n]
	for len(target) > 1 && target[len(target)-1] == '/' {
		target = target[:len(target)-1]
	}
	if i := bytes.LastIndexByte(target, '/'); i >= 0 && i < len(target)-1 {
		target = target[i+1:]
	}
	return string(target), nil
}

// modalias rebuilds the kernel's alias from the ids for trees that lack the file.
func modalias(d *Device) string {
	return fmt.Sprintf("pci:v%08Xd%08Xsv%08Xsd%08Xbc%02Xsc%02Xi%02X",
		d.Vendor, d.DeviceID, d.SubsystemVendor, d.SubsystemDevice,
		d.Class>>16, (d.Class>>8)&0xff, d.Class&0xff)
}
