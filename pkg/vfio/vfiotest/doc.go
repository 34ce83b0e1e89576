// Package vfiotest builds fake sysfs and /dev trees of PCI devices and
// emulates the kernel's answers to the writes that bind and unbind drivers,
// so that code using package vfio can be tested on any machine, through the
// same code path that runs on a node.
//
// A Node describes the machine in a few lines; Build lays it out as the
// kernel does: device directories under sys/devices/pci<domain>:<bus>/,
// nested under their bridges, relative links in sys/bus/pci/devices,
// sys/bus/pci/drivers/<name>/ with bind, unbind, new_id and remove_id,
// sys/bus/pci/drivers_probe, sys/kernel/iommu_groups/<n>/devices, and
// dev/vfio/vfio. Presets describe common boards (HGXH100, A10WithAudio,
// GroupWithNIC, NoIOMMU). Tree.Start runs an Emulator that plays the
// kernel's part until closed.
//
// The emulator answers each write as the kernel's store function does,
// errors included: ENODEV for an address the bus or the driver lacks,
// EBUSY for a bind to a device that has a driver, a driver's probe error
// (vfio-pci refusing an SR-IOV physical function with VFs enabled or a
// bridge; a host driver failing, set with Device.ProbeError), EINVAL,
// EEXIST and ENODEV from new_id and remove_id, EINVAL for a driver_override
// of a page. Code in the test's process writes through Emulator.WriteAttr
// (given to vfio.WithAttrWriter) and gets the answer as the write's error,
// when the kernel's write would return, so its error paths run in unit
// tests. A program run against the tree writes the files instead, named
// pipes for the write-only attributes: the same code answers, after the
// write has returned, and the error cannot reach the writer; Emulator.Writes
// records it.
package vfiotest
