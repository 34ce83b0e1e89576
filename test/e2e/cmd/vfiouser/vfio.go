package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctls of linux/vfio.h: _IO(VFIO_TYPE, VFIO_BASE + n), VFIO_TYPE ';'.
const (
	vfioGetAPIVersion       = 0x3b64
	vfioCheckExtension      = 0x3b65
	vfioSetIOMMU            = 0x3b66
	vfioGroupGetStatus      = 0x3b67
	vfioGroupSetContainer   = 0x3b68
	vfioGroupGetDeviceFD    = 0x3b6a
	vfioDeviceGetInfo       = 0x3b6b
	vfioDeviceGetRegionInfo = 0x3b6c
	vfioDeviceGetIRQInfo    = 0x3b6d
	vfioDeviceSetIRQs       = 0x3b6e
	vfioIOMMUMapDMA         = 0x3b71
	vfioIOMMUUnmapDMA       = 0x3b72

	vfioAPIVersion   = 0
	vfioType1IOMMU   = 1
	groupFlagsViable = 1 << 0

	deviceFlagsPCI = 1 << 1

	regionFlagRead  = 1 << 0
	regionFlagWrite = 1 << 1
	regionFlagMmap  = 1 << 2

	// Region and interrupt indexes of a vfio-pci device.
	regionBAR0   = 0
	regionConfig = 7
	irqMSI       = 1

	irqInfoEventfd      = 1 << 0
	irqSetDataNone      = 1 << 0
	irqSetDataEventfd   = 1 << 2
	irqSetActionTrigger = 1 << 5

	dmaMapRead  = 1 << 0
	dmaMapWrite = 1 << 1
)

type groupStatus struct {
	Argsz, Flags uint32
}

type deviceInfo struct {
	Argsz, Flags, NumRegions, NumIRQs uint32
}

type regionInfo struct {
	Argsz, Flags, Index, CapOffset uint32
	Size, Offset                   uint64
}

type irqInfo struct {
	Argsz, Flags, Index, Count uint32
}

// irqSet carries one eventfd, or none with irqSetDataNone and Count 0.
type irqSet struct {
	Argsz, Flags, Index, Start, Count uint32
	FD                                int32
}

type dmaMap struct {
	Argsz, Flags      uint32
	Vaddr, IOVA, Size uint64
}

type dmaUnmap struct {
	Argsz, Flags uint32
	IOVA, Size   uint64
}

func ioctl(fd int, req uintptr, arg unsafe.Pointer) (uintptr, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	if errno != 0 {
		return r, errno
	}
	return r, nil
}

func ioctlValue(fd int, req, arg uintptr) (uintptr, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	if errno != 0 {
		return r, errno
	}
	return r, nil
}

// nodes are device nodes sorted by what a VMM does with them.
type nodes struct {
	container string   // /dev/vfio/vfio
	groups    []string // /dev/vfio/<group>
	addresses []string // PCI addresses named on the command line
}

// classify sorts the arguments: nodes of the legacy interface, and PCI
// addresses. iommufd nodes (/dev/iommu, /dev/vfio/devices/vfioN) are
// refused: the kernels this was written against have no iommufd.
func classify(args []string) (nodes, error) {
	var n nodes
	for _, a := range args {
		switch {
		case !strings.HasPrefix(a, "/"):
			n.addresses = append(n.addresses, a)
		case filepath.Base(a) == "vfio" && filepath.Base(filepath.Dir(a)) == "vfio":
			n.container = a
		case a == "/dev/iommu" || filepath.Base(filepath.Dir(a)) == "devices":
			return n, fmt.Errorf("%s: iommufd device nodes are not supported", a)
		case filepath.Base(filepath.Dir(a)) == "vfio":
			if _, err := strconv.Atoi(filepath.Base(a)); err != nil {
				return n, fmt.Errorf("%s: not a VFIO group node", a)
			}
			n.groups = append(n.groups, a)
		default:
			return n, fmt.Errorf("%s: not a VFIO device node", a)
		}
	}
	return n, nil
}

// container is an open /dev/vfio/vfio; the IOMMU is set when the first
// group joins.
type container struct {
	fd       int
	iommuSet bool
}

func openContainer(path string) (*container, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open container: %w", err)
	}
	if v, err := ioctlValue(fd, vfioGetAPIVersion, 0); err != nil || v != vfioAPIVersion {
		unix.Close(fd)
		return nil, fmt.Errorf("container %s: VFIO API version %d: %v", path, v, err)
	}
	if ok, err := ioctlValue(fd, vfioCheckExtension, vfioType1IOMMU); err != nil || ok == 0 {
		unix.Close(fd)
		return nil, fmt.Errorf("container %s: no type 1 IOMMU: %v", path, err)
	}
	return &container{fd: fd}, nil
}

// group is an open group node attached to a container.
type group struct {
	node string
	fd   int
}

func (c *container) attach(node string) (*group, error) {
	fd, err := unix.Open(node, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open group %s: %w", node, err)
	}
	g := &group{node: node, fd: fd}
	st := groupStatus{Argsz: uint32(unsafe.Sizeof(groupStatus{}))}
	if _, err := ioctl(fd, vfioGroupGetStatus, unsafe.Pointer(&st)); err != nil {
		return nil, fmt.Errorf("group %s status: %w", node, err)
	}
	if st.Flags&groupFlagsViable == 0 {
		return nil, fmt.Errorf("group %s is not viable: a function is not on a vfio driver", node)
	}
	cfd := int32(c.fd)
	if _, err := ioctl(fd, vfioGroupSetContainer, unsafe.Pointer(&cfd)); err != nil {
		return nil, fmt.Errorf("group %s: set container: %w", node, err)
	}
	if !c.iommuSet {
		if _, err := ioctlValue(c.fd, vfioSetIOMMU, vfioType1IOMMU); err != nil {
			return nil, fmt.Errorf("set IOMMU: %w", err)
		}
		c.iommuSet = true
	}
	return g, nil
}

// members lists the endpoint functions of a group as sysfs has them, in
// address order; bridges are left out, as QEMU and Kata leave them: they
// stay with the host's PCI core.
func members(node string) ([]string, error) {
	dir := filepath.Join("/sys/kernel/iommu_groups", filepath.Base(node), "devices")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("functions of group %s: %w", node, err)
	}
	var out []string
	for _, e := range entries {
		class, err := os.ReadFile(filepath.Join(dir, e.Name(), "class"))
		if err != nil {
			return nil, err
		}
		if !strings.HasPrefix(string(class), "0x0604") {
			out = append(out, e.Name())
		}
	}
	slices.Sort(out)
	if len(out) == 0 {
		return nil, fmt.Errorf("group %s has no endpoint function", node)
	}
	return out, nil
}

// device is one function's device fd with what it reported about itself.
type device struct {
	address string
	fd      int
	info    deviceInfo
	config  regionInfo
	bar0    regionInfo
}

func (g *group) device(address string) (*device, error) {
	name, err := unix.BytePtrFromString(address)
	if err != nil {
		return nil, err
	}
	fd, err := ioctl(g.fd, vfioGroupGetDeviceFD, unsafe.Pointer(name))
	if err != nil {
		return nil, fmt.Errorf("device fd for %s from %s: %w", address, g.node, err)
	}
	d := &device{address: address, fd: int(fd)}
	d.info.Argsz = uint32(unsafe.Sizeof(d.info))
	if _, err := ioctl(d.fd, vfioDeviceGetInfo, unsafe.Pointer(&d.info)); err != nil {
		return nil, fmt.Errorf("%s: device info: %w", address, err)
	}
	if d.info.Flags&deviceFlagsPCI == 0 || d.info.NumRegions <= regionConfig {
		return nil, fmt.Errorf("%s: not a vfio-pci device (flags %#x, %d regions)", address, d.info.Flags, d.info.NumRegions)
	}
	if d.config, err = d.region(regionConfig); err != nil {
		return nil, err
	}
	if d.bar0, err = d.region(regionBAR0); err != nil {
		return nil, err
	}
	if d.bar0.Flags&regionFlagRead == 0 || d.bar0.Size < 4 {
		return nil, fmt.Errorf("BAR0 of %s cannot be read (flags %#x, size %d)", address, d.bar0.Flags, d.bar0.Size)
	}
	return d, nil
}

func (d *device) region(index uint32) (regionInfo, error) {
	ri := regionInfo{Argsz: uint32(unsafe.Sizeof(regionInfo{})), Index: index}
	if _, err := ioctl(d.fd, vfioDeviceGetRegionInfo, unsafe.Pointer(&ri)); err != nil {
		return ri, fmt.Errorf("%s: region %d: %w", d.address, index, err)
	}
	return ri, nil
}

func (d *device) close() { unix.Close(d.fd) }

// readAt reads n (2 or 4) little-endian bytes of a region.
func (d *device) readAt(r regionInfo, off int64, n int) (uint32, error) {
	buf := make([]byte, n)
	if _, err := unix.Pread(d.fd, buf, int64(r.Offset)+off); err != nil {
		return 0, fmt.Errorf("%s: read region %d at %#x: %w", d.address, r.Index, off, err)
	}
	if n == 2 {
		return uint32(binary.LittleEndian.Uint16(buf)), nil
	}
	return binary.LittleEndian.Uint32(buf), nil
}

func (d *device) writeAt(r regionInfo, off int64, n int, v uint32) error {
	buf := make([]byte, 4)
	binary.LittleEndian.PutUint32(buf, v)
	if _, err := unix.Pwrite(d.fd, buf[:n], int64(r.Offset)+off); err != nil {
		return fmt.Errorf("%s: write region %d at %#x: %w", d.address, r.Index, off, err)
	}
	return nil
}

// mapBAR0 maps BAR0 as a VMM maps it into a guest.
func (d *device) mapBAR0() (mmio, error) {
	if d.bar0.Flags&regionFlagMmap == 0 {
		return nil, fmt.Errorf("%s: BAR0 cannot be mapped (flags %#x)", d.address, d.bar0.Flags)
	}
	b, err := unix.Mmap(d.fd, int64(d.bar0.Offset), int(d.bar0.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("%s: mmap BAR0: %w", d.address, err)
	}
	return mmio(b), nil
}

// msiToEventfd routes the device's MSI vector 0 to a new eventfd.
func (d *device) msiToEventfd() (*eventfd, error) {
	ii := irqInfo{Argsz: uint32(unsafe.Sizeof(irqInfo{})), Index: irqMSI}
	if _, err := ioctl(d.fd, vfioDeviceGetIRQInfo, unsafe.Pointer(&ii)); err != nil {
		return nil, fmt.Errorf("%s: MSI info: %w", d.address, err)
	}
	if ii.Count < 1 || ii.Flags&irqInfoEventfd == 0 {
		return nil, fmt.Errorf("%s: MSI cannot be signalled through an eventfd (count %d, flags %#x)", d.address, ii.Count, ii.Flags)
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, err
	}
	set := irqSet{Argsz: uint32(unsafe.Sizeof(irqSet{})), Flags: irqSetDataEventfd | irqSetActionTrigger,
		Index: irqMSI, Count: 1, FD: int32(efd)}
	if _, err := ioctl(d.fd, vfioDeviceSetIRQs, unsafe.Pointer(&set)); err != nil {
		unix.Close(efd)
		return nil, fmt.Errorf("%s: MSI to eventfd: %w", d.address, err)
	}
	return &eventfd{fd: efd}, nil
}

func (d *device) msiOff() error {
	set := irqSet{Argsz: 20, Flags: irqSetDataNone | irqSetActionTrigger, Index: irqMSI}
	if _, err := ioctl(d.fd, vfioDeviceSetIRQs, unsafe.Pointer(&set)); err != nil {
		return fmt.Errorf("%s: MSI off: %w", d.address, err)
	}
	return nil
}

// mapDMA makes buf visible to the devices of the container at iova.
func (c *container) mapDMA(buf []byte, iova uint64, flags uint32) error {
	m := dmaMap{Argsz: uint32(unsafe.Sizeof(dmaMap{})), Flags: flags,
		Vaddr: uint64(uintptr(unsafe.Pointer(&buf[0]))), IOVA: iova, Size: uint64(len(buf))}
	if _, err := ioctl(c.fd, vfioIOMMUMapDMA, unsafe.Pointer(&m)); err != nil {
		return fmt.Errorf("map %d bytes at IOVA %#x: %w", len(buf), iova, err)
	}
	return nil
}

// unmapDMA removes a mapping and checks that exactly it went.
func (c *container) unmapDMA(iova, size uint64) error {
	u := dmaUnmap{Argsz: uint32(unsafe.Sizeof(dmaUnmap{})), IOVA: iova, Size: size}
	if _, err := ioctl(c.fd, vfioIOMMUUnmapDMA, unsafe.Pointer(&u)); err != nil {
		return fmt.Errorf("unmap IOVA %#x: %w", iova, err)
	}
	if u.Size != size {
		return fmt.Errorf("unmap IOVA %#x: %d bytes unmapped, want %d", iova, u.Size, size)
	}
	return nil
}

// eventfd is the receiving end of an interrupt.
type eventfd struct{ fd int }

var errNoInterrupt = errors.New("no interrupt")

// wait returns the number of interrupts signalled since the last wait,
// waiting up to timeoutMs for the first.
func (e *eventfd) wait(timeoutMs int) (uint64, error) {
	fds := []unix.PollFd{{Fd: int32(e.fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, timeoutMs)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return 0, err
		}
		if n == 0 {
			return 0, errNoInterrupt
		}
		break
	}
	var buf [8]byte
	if _, err := unix.Read(e.fd, buf[:]); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(buf[:]), nil
}

// pending says whether an interrupt is signalled and not yet read.
func (e *eventfd) pending() bool {
	fds := []unix.PollFd{{Fd: int32(e.fd), Events: unix.POLLIN}}
	n, _ := unix.Poll(fds, 0)
	return n > 0
}

func (e *eventfd) close() { unix.Close(e.fd) }
