// Package vfio reads the PCI devices and IOMMU groups of a node from sysfs
// and gives whole IOMMU groups to VFIO drivers for device passthrough, and
// back.
//
// Sysfs is the only reader of sysfs; every path below it is injected, so the
// same code runs against /sys on a node and against a fake tree built by
// package vfiotest in tests.
//
// A Selector picks devices (NVIDIA GPUs by default); NewPlan gathers the
// IOMMU groups they live in, with the other functions of each group, and
// refuses a group that holds a function bound to a host driver that was not
// selected. A Manager binds a Plan: per group in parallel, each function
// through driver_override, unbind and drivers_probe, verified by its driver
// link and /dev/vfio/<group> within a timeout, the vfio variant driver
// chosen from modules.alias. The driver each function had is recorded in a
// state directory so that Unbind can give it back.
//
// The package never logs and never exits; results and errors are returned.
package vfio
