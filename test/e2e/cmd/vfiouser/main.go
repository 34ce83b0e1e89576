// Command vfiouser uses VFIO devices the way a VMM (QEMU, as Kata starts
// it) does, through the legacy group interface: it opens the container and
// the group node, attaches the group to the container, sets the type 1
// IOMMU, takes a device fd for each function, and reads BAR0 through it.
// It is the reference for what a VMM needs from the device nodes the
// agents hand out, and the "VM" that holds a group in the real-kernel
// tests.
//
//	vfiouser hold GROUP-NODE ADDRESS...
//
// prints "ready pid=N" once every device is open, then keeps reading each
// device's BAR0 every 50 ms until SIGTERM; a read that fails or returns
// another value than the first prints "lost ..." and exits 3, as a VM
// whose device was pulled from under it would notice.
package main

import (
	"encoding/binary"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctls of linux/vfio.h: _IO(VFIO_TYPE, VFIO_BASE + n), VFIO_TYPE ';'.
const (
	vfioGetAPIVersion     = 0x3b64
	vfioCheckExtension    = 0x3b65
	vfioSetIOMMU          = 0x3b66
	vfioGroupGetStatus    = 0x3b67
	vfioGroupSetContainer = 0x3b68
	vfioGroupGetDeviceFD  = 0x3b6a
	vfioDeviceGetRegion   = 0x3b6c

	vfioAPIVersion      = 0
	vfioType1IOMMU      = 1
	groupFlagsViable    = 1 << 0
	regionInfoFlagsRead = 1 << 0
)

type groupStatus struct {
	Argsz, Flags uint32
}

type regionInfo struct {
	Argsz, Flags, Index, CapOffset uint32
	Size, Offset                   uint64
}

func main() {
	if len(os.Args) < 4 || os.Args[1] != "hold" {
		fmt.Fprintln(os.Stderr, "usage: vfiouser hold GROUP-NODE ADDRESS...")
		os.Exit(2)
	}
	if err := hold(os.Args[2], os.Args[3:]); err != nil {
		fmt.Fprintln(os.Stderr, "vfiouser:", err)
		os.Exit(1)
	}
}

func ioctl(fd int, req, arg uintptr) (uintptr, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	if errno != 0 {
		return r, errno
	}
	return r, nil
}

// bar0 is one device's BAR0 as the device fd exposes it.
type bar0 struct {
	address string
	fd      int
	offset  int64
	first   uint32
}

func (b *bar0) read() (uint32, error) {
	var buf [4]byte
	if _, err := unix.Pread(b.fd, buf[:], b.offset); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint32(buf[:]), nil
}

func hold(groupNode string, addresses []string) error {
	container, err := unix.Open("/dev/vfio/vfio", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open container: %w", err)
	}
	if v, err := ioctl(container, vfioGetAPIVersion, 0); err != nil || v != vfioAPIVersion {
		return fmt.Errorf("VFIO API version %d: %v", v, err)
	}
	if ok, err := ioctl(container, vfioCheckExtension, vfioType1IOMMU); err != nil || ok == 0 {
		return fmt.Errorf("no type 1 IOMMU: %v", err)
	}
	group, err := unix.Open(groupNode, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open group %s: %w", groupNode, err)
	}
	st := groupStatus{Argsz: uint32(unsafe.Sizeof(groupStatus{}))}
	if _, err := ioctl(group, vfioGroupGetStatus, uintptr(unsafe.Pointer(&st))); err != nil {
		return fmt.Errorf("group status: %w", err)
	}
	if st.Flags&groupFlagsViable == 0 {
		return fmt.Errorf("group %s is not viable: a function is not on a vfio driver", groupNode)
	}
	c := int32(container)
	if _, err := ioctl(group, vfioGroupSetContainer, uintptr(unsafe.Pointer(&c))); err != nil {
		return fmt.Errorf("set container: %w", err)
	}
	if _, err := ioctl(container, vfioSetIOMMU, vfioType1IOMMU); err != nil {
		return fmt.Errorf("set IOMMU: %w", err)
	}
	var bars []*bar0
	for _, addr := range addresses {
		name, err := unix.BytePtrFromString(addr)
		if err != nil {
			return err
		}
		fd, err := ioctl(group, vfioGroupGetDeviceFD, uintptr(unsafe.Pointer(name)))
		if err != nil {
			return fmt.Errorf("device fd for %s: %w", addr, err)
		}
		ri := regionInfo{Argsz: uint32(unsafe.Sizeof(regionInfo{})), Index: 0}
		if _, err := ioctl(int(fd), vfioDeviceGetRegion, uintptr(unsafe.Pointer(&ri))); err != nil {
			return fmt.Errorf("BAR0 of %s: %w", addr, err)
		}
		if ri.Flags&regionInfoFlagsRead == 0 || ri.Size < 4 {
			return fmt.Errorf("BAR0 of %s cannot be read (flags %#x, size %d)", addr, ri.Flags, ri.Size)
		}
		b := &bar0{address: addr, fd: int(fd), offset: int64(ri.Offset)}
		if b.first, err = b.read(); err != nil {
			return fmt.Errorf("read BAR0 of %s: %w", addr, err)
		}
		fmt.Printf("%s BAR0[0]=%#08x\n", addr, b.first)
		bars = append(bars, b)
	}
	fmt.Printf("ready pid=%d\n", os.Getpid())

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			fmt.Println("released")
			return nil
		case <-tick.C:
		}
		for _, b := range bars {
			if v, err := b.read(); err != nil || v != b.first {
				fmt.Printf("lost %s: BAR0[0]=%#08x err=%v\n", b.address, v, err)
				os.Exit(3)
			}
		}
	}
}
