package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// IOVAs of the checks: below edu's 28-bit DMA mask, away from anything
// the IOMMU reserves (the MSI window is at 0xfee00000).
const (
	iovaSource  = 0x100000
	iovaTarget  = 0x200000
	iovaBlocked = 0x300000

	// How long an interrupt may take: edu runs a DMA 100 ms after it is
	// started; TCG on a loaded machine is slower.
	irqTimeoutMs = 10000
)

func check(args []string) error {
	n, err := classify(args)
	if err != nil {
		return err
	}
	if n.container == "" {
		return errors.New("no container node (/dev/vfio/vfio) among the nodes: a VMM cannot set up an IOMMU without it")
	}
	if len(n.groups) == 0 {
		return errors.New("no group node among the nodes")
	}
	if len(n.addresses) > 0 {
		return fmt.Errorf("check takes device nodes only, not %v", n.addresses)
	}
	c, err := openContainer(n.container)
	if err != nil {
		return err
	}
	fmt.Printf("container %s: API version %d, type 1 IOMMU\n", n.container, vfioAPIVersion)
	for _, node := range n.groups {
		addresses, err := members(node)
		if err != nil {
			return err
		}
		g, err := c.attach(node)
		if err != nil {
			return err
		}
		fmt.Printf("group %s: viable, attached; functions %s\n", node, strings.Join(addresses, " "))
		for _, addr := range addresses {
			d, err := g.device(addr)
			if err != nil {
				return err
			}
			if err := checkDevice(c, g, d); err != nil {
				return err
			}
			d.close()
			fmt.Printf("ok %s %s\n", node, addr)
		}
	}
	return nil
}

func checkDevice(c *container, g *group, d *device) error {
	vendor, err := d.readAt(d.config, 0, 2)
	if err != nil {
		return err
	}
	devid, err := d.readAt(d.config, 2, 2)
	if err != nil {
		return err
	}
	id := fmt.Sprintf("%04x:%04x", vendor, devid)
	if want := sysfsID(d.address); id != want {
		return fmt.Errorf("%s: config space through the device fd says %s, sysfs %s", d.address, id, want)
	}
	ident, err := d.readAt(d.bar0, eduRegIdent, 4)
	if err != nil {
		return err
	}
	fmt.Printf("device %s via %s: %s, %d regions, %d irqs, BAR0 %#x bytes, BAR0[0]=%#08x\n",
		d.address, g.node, id, d.info.NumRegions, d.info.NumIRQs, d.bar0.Size, ident)
	if id != eduVendorDevice {
		return nil
	}
	if ident != eduIdent {
		return fmt.Errorf("%s: identification register reads %#08x by pread, want %#08x", d.address, ident, eduIdent)
	}
	m, err := d.mapBAR0()
	if err != nil {
		return err
	}
	defer unix.Munmap(m)
	if got := m.read(eduRegIdent); got != eduIdent {
		return fmt.Errorf("%s: identification register reads %#08x through mmap, want %#08x", d.address, got, eduIdent)
	}
	live, err := liveness(m)
	if err != nil {
		return fmt.Errorf("%s: %w", d.address, err)
	}
	fmt.Printf("%s mmio: ident %#08x, %s\n", d.address, uint32(eduIdent), live)

	// vfio-pci leaves bus mastering off; a guest driver turns it on, and
	// QEMU passes that write through.
	cmd, err := d.readAt(d.config, pciCommand, 2)
	if err != nil {
		return err
	}
	if err := d.writeAt(d.config, pciCommand, 2, cmd|pciCommandMemory|pciCommandMaster); err != nil {
		return err
	}
	defer d.writeAt(d.config, pciCommand, 2, cmd)
	if got, err := d.readAt(d.config, pciCommand, 2); err != nil || got&pciCommandMaster == 0 {
		return fmt.Errorf("%s: bus mastering did not turn on (command %#04x): %v", d.address, got, err)
	}

	efd, err := d.msiToEventfd()
	if err != nil {
		return err
	}
	defer efd.close()
	defer d.msiOff()
	if err := checkMSI(d, m, efd); err != nil {
		return err
	}
	return checkDMA(c, d, m, efd)
}

// checkMSI raises an interrupt through edu's raise register: exactly one
// signal reaches the eventfd, the status register holds the raised bits,
// and the acknowledgement clears them.
func checkMSI(d *device, m mmio, efd *eventfd) error {
	const bits = 0x5a5a
	m.write(eduRegIRQRaise, bits)
	n, err := efd.wait(irqTimeoutMs)
	if err != nil {
		return fmt.Errorf("%s: MSI after raising %#x: %w", d.address, bits, err)
	}
	status := m.read(eduRegIRQStat)
	m.write(eduRegIRQAck, bits)
	after := m.read(eduRegIRQStat)
	if n != 1 || status != bits || after != 0 {
		return fmt.Errorf("%s: MSI: %d signals, status %#x then %#x after ack; want 1, %#x, 0", d.address, n, status, after, bits)
	}
	fmt.Printf("%s msi: eventfd signalled 1 time, status %#x, 0 after ack\n", d.address, status)
	return nil
}

// checkDMA copies random bytes from host memory into the device and back
// into another page through the IOMMU, then shows that an IOVA whose
// mapping was removed reaches no memory.
func checkDMA(c *container, d *device, m mmio, efd *eventfd) error {
	page := os.Getpagesize()
	alloc := func() ([]byte, error) {
		return unix.Mmap(-1, 0, page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	}
	src, err := alloc()
	if err != nil {
		return err
	}
	dst, err := alloc()
	if err != nil {
		return err
	}
	blocked, err := alloc()
	if err != nil {
		return err
	}
	defer unix.Munmap(src)
	defer unix.Munmap(dst)
	defer unix.Munmap(blocked)
	seed := uint32(os.Getpid())<<8 ^ uint32(len(d.address))
	pattern(src, seed)
	pattern(dst, ^seed) // differs from src nearly everywhere
	dstBefore := append([]byte(nil), dst...)

	if err := c.mapDMA(src, iovaSource, dmaMapRead); err != nil {
		return fmt.Errorf("%s: %w", d.address, err)
	}
	defer c.unmapDMA(iovaSource, uint64(page))
	if err := c.mapDMA(dst, iovaTarget, dmaMapRead|dmaMapWrite); err != nil {
		return fmt.Errorf("%s: %w", d.address, err)
	}
	defer c.unmapDMA(iovaTarget, uint64(page))

	wait := func() error { return dmaIRQ(m, efd) }
	if err := dma(m, iovaSource, eduBuffer, false, true, wait); err != nil {
		return fmt.Errorf("%s: %w", d.address, err)
	}
	if err := dma(m, eduBuffer, iovaTarget, true, true, wait); err != nil {
		return fmt.Errorf("%s: %w", d.address, err)
	}
	if err := compare(dst[:eduDMALen], src[:eduDMALen]); err != nil {
		return fmt.Errorf("%s: DMA round trip through IOVA %#x and %#x: %w", d.address, iovaSource, iovaTarget, err)
	}
	if err := compare(dst[eduDMALen:], dstBefore[eduDMALen:]); err != nil {
		return fmt.Errorf("%s: DMA wrote beyond its %d bytes: %w", d.address, eduDMALen, err)
	}
	fmt.Printf("%s dma: %d bytes memory -> device (IOVA %#x) -> memory (IOVA %#x): equal byte for byte; the other %d bytes of the page untouched\n",
		d.address, eduDMALen, iovaSource, iovaTarget, page-eduDMALen)

	// A page that was mapped and is no more: the device must neither read
	// it nor write it through its old IOVA (the IOMMU faults both).
	for i := range blocked {
		blocked[i] = 0xa5
	}
	if err := c.mapDMA(blocked, iovaBlocked, dmaMapRead|dmaMapWrite); err != nil {
		return fmt.Errorf("%s: %w", d.address, err)
	}
	if err := c.unmapDMA(iovaBlocked, uint64(page)); err != nil {
		return fmt.Errorf("%s: %w", d.address, err)
	}
	if err := dma(m, iovaBlocked, eduBuffer, false, true, wait); err != nil {
		return fmt.Errorf("%s: %w", d.address, err)
	}
	if err := dma(m, eduBuffer, iovaTarget, true, true, wait); err != nil {
		return fmt.Errorf("%s: %w", d.address, err)
	}
	read := dst[:eduDMALen]
	for i, b := range read {
		if b == 0xa5 || b != read[0] {
			return fmt.Errorf("%s: after a DMA from the unmapped IOVA %#x the device holds %#02x at offset %d (the page once mapped there holds 0xa5 throughout)", d.address, iovaBlocked, b, i)
		}
	}
	if err := dma(m, eduBuffer, iovaBlocked, true, true, wait); err != nil {
		return fmt.Errorf("%s: %w", d.address, err)
	}
	for i, b := range blocked {
		if b != 0xa5 {
			return fmt.Errorf("%s: a DMA to the unmapped IOVA %#x changed the page once mapped there (offset %d: %#02x)", d.address, iovaBlocked, i, b)
		}
	}
	fmt.Printf("%s blocked: a DMA from unmapped IOVA %#x gave the device %d bytes of %#02x, not the page once mapped there; a DMA to it left that page unchanged\n",
		d.address, iovaBlocked, eduDMALen, read[0])
	return nil
}

// dmaIRQ waits for the interrupt a transfer raises when done, checks that
// it is edu's DMA interrupt and acknowledges it.
func dmaIRQ(m mmio, efd *eventfd) error {
	n, err := efd.wait(irqTimeoutMs)
	if err != nil {
		return err
	}
	status := m.read(eduRegIRQStat)
	m.write(eduRegIRQAck, status)
	if n != 1 || status != eduDMAIRQValue || efd.pending() {
		return fmt.Errorf("done: %d signals, interrupt status %#x; want 1 and %#x", n, status, eduDMAIRQValue)
	}
	return nil
}

func sysfsID(address string) string {
	read := func(f string) string {
		b, _ := os.ReadFile(filepath.Join("/sys/bus/pci/devices", address, f))
		return strings.TrimPrefix(strings.TrimSpace(string(b)), "0x")
	}
	return read("vendor") + ":" + read("device")
}
