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
package vfiotest
