// Command vfiouser uses VFIO devices the way a VMM (QEMU, as Kata starts
// it) does, and is the project's reference for what a VMM needs from the
// device nodes the agents hand out. Given only those nodes (the container
// /dev/vfio/vfio and a group node /dev/vfio/<group>, as the device plugin's
// Allocate and the CDI spec name them), it does what QEMU's vfio-pci does
// before and while a guest runs:
//
//  1. opens the container, checks the API version and the type 1 IOMMU;
//  2. opens the group node, checks that the group is viable (every function
//     of the group on a vfio driver), attaches it to the container and sets
//     the type 1 IOMMU;
//  3. takes a device fd for every endpoint function of the group (the
//     functions are listed in sysfs under /sys/kernel/iommu_groups/<group>,
//     which is where QEMU and Kata find them too; bridges stay with the
//     host), and reads the device's regions and interrupts from it;
//  4. reads config space and BAR0 through the fd (pread) and through an
//     mmap of BAR0 (a guest's MMIO);
//  5. turns on bus mastering in config space (vfio-pci leaves it off), maps
//     host memory into the IOMMU (VFIO_IOMMU_MAP_DMA) and has the device
//     copy it in and out (a guest's DMA);
//  6. routes the device's MSI to an eventfd (VFIO_DEVICE_SET_IRQS), as KVM's
//     irqfd takes it.
//
// Subcommands:
//
//	vfiouser check NODE...
//
// runs every step above for each group node and fails (exit 1) at the first
// check that does not hold. On QEMU's edu device (1234:11e8) the checks
// are exact: the identification register reads 0x010000ed by pread and by
// mmap; the liveness register reads back the complement of what was
// written; an MSI raised through the interrupt-raise register arrives on
// the eventfd once, with the interrupt status showing the raised bits; 2 KiB
// of random bytes go from host memory to the device and back into another
// buffer through two IOMMU mappings, and the copy equals the original byte
// for byte while the rest of the target page stays as it was; and an IOVA
// whose mapping was removed reaches nothing: a DMA from it gives the device
// zeros, not the page once mapped there, and a DMA to it leaves that page
// unchanged (the IOMMU blocks both; the kernel logs DMAR faults naming the
// IOVA, which the tests read from the kernel log). Other devices get steps
// 1 to 4.
//
//	vfiouser hold NODE... [ADDRESS...]
//
// takes the devices (ADDRESS..., or every endpoint function of the group)
// and prints "ready pid=N" once every device is open, then keeps reading
// each device's BAR0 every 50 ms until SIGTERM; a read that fails or
// returns another value than the first prints "lost ..." and exits 3, as a
// VM whose device was pulled from under it would notice. Without a
// container node among the NODEs it opens /dev/vfio/vfio, as QEMU does.
//
//	vfiouser sysfs VENDOR:DEVICE
//
// is the other side of passthrough: run inside a VM that was given the
// device, it drives the one device with those IDs as a guest driver would,
// through sysfs (resource0 mmap, config space) and the guest's physical
// memory (/proc/self/pagemap): identification, liveness and a DMA round
// trip, and reports the PCIe port the device sits behind.
//
// edu's limits shape the DMA checks: QEMU 7.2's edu aborts on a 4 KiB
// transfer (2 KiB are used), and its DMA mask is 28 bits (every IOVA and
// guest-physical address used lies below 256 MiB).
package main

import (
	"fmt"
	"os"
)

func main() {
	var err error
	switch {
	case len(os.Args) >= 3 && os.Args[1] == "check":
		err = check(os.Args[2:])
	case len(os.Args) >= 3 && os.Args[1] == "hold":
		err = hold(os.Args[2:])
	case len(os.Args) == 3 && os.Args[1] == "sysfs":
		err = guestDriver(os.Args[2])
	default:
		fmt.Fprintln(os.Stderr, "usage: vfiouser check NODE...\n       vfiouser hold NODE... [ADDRESS...]\n       vfiouser sysfs VENDOR:DEVICE")
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "vfiouser:", err)
		os.Exit(1)
	}
}
