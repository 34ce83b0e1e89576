package main

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// guestDriver drives the one device with the given IDs from inside a VM,
// without VFIO: what a guest driver sees of a passed-through device.
func guestDriver(id string) error {
	addr, err := findDevice(id)
	if err != nil {
		return err
	}
	dir := filepath.Join("/sys/bus/pci/devices", addr)
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return err
	}
	port := filepath.Base(filepath.Dir(real))
	portClass := readTrimmed(filepath.Join(filepath.Dir(real), "class"))
	fmt.Printf("device %s at %s behind %s (%s, class %s)\n", id, addr, port, sysfsID(port), portClass)

	// The guest's firmware assigned the BAR and turned on memory decoding;
	// bus mastering is the driver's to turn on.
	cfg, err := os.OpenFile(filepath.Join(dir, "config"), os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer cfg.Close()
	var cmd [2]byte
	if _, err := cfg.ReadAt(cmd[:], pciCommand); err != nil {
		return err
	}
	binary.LittleEndian.PutUint16(cmd[:], binary.LittleEndian.Uint16(cmd[:])|pciCommandMemory|pciCommandMaster)
	if _, err := cfg.WriteAt(cmd[:], pciCommand); err != nil {
		return fmt.Errorf("%s: turn on bus mastering: %w", addr, err)
	}

	res, err := os.OpenFile(filepath.Join(dir, "resource0"), os.O_RDWR|os.O_SYNC, 0)
	if err != nil {
		return err
	}
	defer res.Close()
	st, err := res.Stat()
	if err != nil {
		return err
	}
	b, err := unix.Mmap(int(res.Fd()), 0, int(st.Size()), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("%s: mmap BAR0: %w", addr, err)
	}
	m := mmio(b)
	defer unix.Munmap(b)
	if got := m.read(eduRegIdent); got != eduIdent {
		return fmt.Errorf("%s: identification register reads %#08x, want %#08x", addr, got, eduIdent)
	}
	live, err := liveness(m)
	if err != nil {
		return fmt.Errorf("%s: %w", addr, err)
	}
	fmt.Printf("%s mmio: BAR0 %#x bytes, ident %#08x, %s\n", addr, st.Size(), uint32(eduIdent), live)

	// Without an IOMMU in this VM the device addresses guest-physical
	// memory: two locked pages, their frames read from pagemap.
	page := os.Getpagesize()
	src, srcPhys, err := physPage(page)
	if err != nil {
		return err
	}
	dst, dstPhys, err := physPage(page)
	if err != nil {
		return err
	}
	pattern(src, uint32(time.Now().UnixNano()))
	pattern(dst, uint32(time.Now().UnixNano())^0xffffffff)
	dstBefore := append([]byte(nil), dst...)
	wait := pollDMA(m, 30*time.Second)
	if err := dma(m, srcPhys, eduBuffer, false, false, wait); err != nil {
		return fmt.Errorf("%s: %w", addr, err)
	}
	if err := dma(m, eduBuffer, dstPhys, true, false, wait); err != nil {
		return fmt.Errorf("%s: %w", addr, err)
	}
	if err := compare(dst[:eduDMALen], src[:eduDMALen]); err != nil {
		return fmt.Errorf("%s: DMA round trip through guest-physical %#x and %#x: %w", addr, srcPhys, dstPhys, err)
	}
	if err := compare(dst[eduDMALen:], dstBefore[eduDMALen:]); err != nil {
		return fmt.Errorf("%s: DMA wrote beyond its %d bytes: %w", addr, eduDMALen, err)
	}
	fmt.Printf("%s dma: %d bytes memory -> device -> memory (guest-physical %#x -> %#x): equal byte for byte; the other %d bytes of the page untouched\n",
		addr, eduDMALen, srcPhys, dstPhys, page-eduDMALen)
	return nil
}

// findDevice returns the address of the one PCI device with the IDs.
func findDevice(id string) (string, error) {
	entries, err := os.ReadDir("/sys/bus/pci/devices")
	if err != nil {
		return "", err
	}
	var found []string
	for _, e := range entries {
		if sysfsID(e.Name()) == id {
			found = append(found, e.Name())
		}
	}
	if len(found) != 1 {
		return "", fmt.Errorf("%d devices %s in this VM (%v), want one", len(found), id, found)
	}
	return found[0], nil
}

// physPage returns a locked page of memory and its guest-physical address,
// which must be within edu's DMA mask.
func physPage(size int) ([]byte, uint64, error) {
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_LOCKED|unix.MAP_POPULATE)
	if err != nil {
		return nil, 0, err
	}
	pm, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return nil, 0, err
	}
	defer pm.Close()
	var e [8]byte
	if _, err := pm.ReadAt(e[:], int64(uintptr(unsafe.Pointer(&b[0]))/uintptr(size))*8); err != nil {
		return nil, 0, err
	}
	v := binary.LittleEndian.Uint64(e[:])
	const present, pfnMask = 1 << 63, 1<<55 - 1
	if v&present == 0 || v&pfnMask == 0 {
		return nil, 0, fmt.Errorf("pagemap gives no frame for a locked page (%#x): not root?", v)
	}
	phys := (v & pfnMask) * uint64(size)
	if phys+uint64(size) > eduDMALimit {
		return nil, 0, fmt.Errorf("page at guest-physical %#x is beyond edu's 28-bit DMA mask: give the VM at most 256 MiB", phys)
	}
	return b, phys, nil
}

func readTrimmed(path string) string {
	b, _ := os.ReadFile(path)
	return strings.TrimSpace(string(b))
}
