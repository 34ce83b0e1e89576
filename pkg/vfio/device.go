package vfio

import "strings"

// PCI ids and classes this package reasons about.
const (
	VendorNVIDIA uint16 = 0x10de

	classVGA      = 0x0300 // class >> 8
	class3D       = 0x0302
	classOtherBr  = 0x0680 // NVSwitch reports "bridge, other"
	classPCIToPCI = 0x0604
	classHostBr   = 0x0600
)

// DriverVFIOPCI is the generic vfio driver, used when no variant fits.
const DriverVFIOPCI = "vfio-pci"

// Device is one PCI function as sysfs shows it.
type Device struct {
	// Address is the canonical PCI address, e.g. "0000:65:00.0".
	Address         string
	Vendor          uint16
	DeviceID        uint16
	Class           uint32 // 24 bits: base class, subclass, programming interface
	SubsystemVendor uint16
	SubsystemDevice uint16
	// Driver is the bound driver's name, "" when none.
	Driver string
	// DriverOverride is the forced driver, "" when the kernel reads "(null)".
	DriverOverride string
	// IOMMUGroup is the group number, -1 without an IOMMU.
	IOMMUGroup int
	// NUMANode is the node the device is attached to, -1 when sysfs says none.
	NUMANode int
	// VFIODevice is the vfio character device ("vfio3") the kernel exposes
	// under vfio-dev/ when a vfio driver holds the device; "" otherwise.
	VFIODevice string
	// Modalias is the kernel's module alias for the device.
	Modalias string
	// PhysFn is the physical function's address when this is an SR-IOV VF.
	PhysFn string
	// TotalVFs is the number of VFs an SR-IOV physical function offers,
	// NumVFs the number enabled now.
	TotalVFs, NumVFs int
	// Parent is the address of the upstream PCI bridge, "" on a root bus.
	Parent string
	// Path is the device's directory with symbolic links resolved.
	Path string
}

// IsBridge reports whether the function is a PCI bridge (host or PCI-to-PCI);
// bridges stay with the host when their group is given to VFIO.
func (d *Device) IsBridge() bool {
	c := d.Class >> 8
	return c == classPCIToPCI || c == classHostBr
}

// IsGPU reports whether the class is VGA or 3D controller.
func (d *Device) IsGPU() bool {
	c := d.Class >> 8
	return c == classVGA || c == class3D
}

// IsNVSwitch reports whether the function is an NVIDIA NVSwitch.
func (d *Device) IsNVSwitch() bool {
	return d.Vendor == VendorNVIDIA && d.Class>>8 == classOtherBr
}

// IsVF reports whether the function is an SR-IOV virtual function.
func (d *Device) IsVF() bool { return d.PhysFn != "" }

// BoundToVFIO reports whether a vfio driver holds the device.
func (d *Device) BoundToVFIO() bool { return IsVFIODriver(d.Driver) }

// IsVFIODriver reports whether name is vfio-pci or one of its variant drivers
// (nvgrace_gpu_vfio_pci, mlx5_vfio_pci, ...).
func IsVFIODriver(name string) bool {
	return name == DriverVFIOPCI || strings.HasSuffix(name, "_vfio_pci")
}
