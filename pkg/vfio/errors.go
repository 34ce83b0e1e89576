package vfio

import "errors"

// Sentinel errors. Every error this package returns wraps one of these with
// the object it concerns, so callers can tell causes apart with errors.Is.
var (
	// ErrNoIOMMU means the kernel exposes no IOMMU groups: VFIO cannot work.
	ErrNoIOMMU = errors.New("no IOMMU groups: enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line; VT-d or AMD-Vi, and ACS, in the BIOS)")
	// ErrDeviceNotFound means no PCI device has the given address.
	ErrDeviceNotFound = errors.New("no such PCI device")
	// ErrInvalidAddress means a string is not a PCI address.
	ErrInvalidAddress = errors.New("invalid PCI address")
	// ErrInvalidSelector means a selector string cannot be parsed.
	ErrInvalidSelector = errors.New("invalid selector")
	// ErrNotSelected means a device was named that the selector does not match.
	ErrNotSelected = errors.New("device not matched by the selector")
	// ErrGroupNotViable means an IOMMU group holds a device that is bound to a
	// host driver and was not selected, so the group cannot be given to VFIO.
	ErrGroupNotViable = errors.New("iommu group not viable")
	// ErrTimeout means the kernel did not finish an operation in time.
	ErrTimeout = errors.New("timed out")
	// ErrDriverNotLoaded means a driver is absent from the PCI bus.
	ErrDriverNotLoaded = errors.New("driver not loaded")
	// ErrNoState means no usable record of a device's previous driver exists.
	ErrNoState = errors.New("no recorded driver")
	// ErrNoCDev means a device has no vfio cdev (kernel before 6.2, or
	// CONFIG_VFIO_DEVICE_CDEV off), so iommufd mode cannot use it.
	ErrNoCDev = errors.New("no vfio cdev")
	// ErrVFsEnabled means an SR-IOV physical function has virtual functions
	// enabled: vfio-pci cannot take it while they exist.
	ErrVFsEnabled = errors.New("SR-IOV virtual functions enabled")
	// ErrInUse means a process holds a device open: its VFIO node (a VM is
	// using it), so taking it from vfio would pull it from under the VM; or
	// its host driver's node (/dev/nvidiaN), so the driver cannot let it go.
	ErrInUse = errors.New("in use")
	// ErrSysfs means a sysfs attribute is missing or malformed.
	ErrSysfs = errors.New("bad sysfs attribute")
)
