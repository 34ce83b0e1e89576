package main

import (
	"fmt"
	"sync/atomic"
	"time"
	"unsafe"
)

// QEMU's edu device (hw/misc/edu.c, docs/specs/edu.rst): its BAR0
// registers and the values they must hold.
const (
	eduVendorDevice = "1234:11e8"
	eduIdent        = 0x010000ed // 0xRRrr00ed: version 1.0

	eduRegIdent    = 0x00
	eduRegLiveness = 0x04 // reads back the complement of what was written
	eduRegIRQStat  = 0x24
	eduRegIRQRaise = 0x60
	eduRegIRQAck   = 0x64
	eduRegDMASrc   = 0x80
	eduRegDMADst   = 0x88
	eduRegDMACount = 0x90
	eduRegDMACmd   = 0x98

	eduDMAStart    = 1 << 0
	eduDMAToHost   = 1 << 1 // from the device's buffer to memory; clear: the other way
	eduDMAIRQ      = 1 << 2 // raise interrupt status 0x100 when done
	eduDMAIRQValue = 0x100

	// The device's DMA buffer, as addressed in its DMA registers.
	eduBuffer = 0x40000
	// QEMU 7.2's edu aborts on a transfer of its whole 4 KiB buffer.
	eduDMALen = 2048
	// edu clamps DMA addresses to 28 bits.
	eduDMALimit = 1 << 28

	pciCommand       = 0x04
	pciCommandMemory = 1 << 1
	pciCommandMaster = 1 << 2
)

// mmio is a mapped BAR; accesses are 32-bit, as edu wants them below 0x80
// and accepts them above.
type mmio []byte

func (m mmio) read(off int) uint32 {
	return atomic.LoadUint32((*uint32)(unsafe.Pointer(&m[off])))
}

func (m mmio) write(off int, v uint32) {
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&m[off])), v)
}

// liveness writes a value to the liveness register and checks that its
// complement comes back.
func liveness(m mmio) (string, error) {
	const v = 0x12345678
	m.write(eduRegLiveness, v)
	if got := m.read(eduRegLiveness); got != ^uint32(v) {
		return "", fmt.Errorf("liveness register: wrote %#08x, read %#08x, want %#08x", v, got, ^uint32(v))
	}
	return fmt.Sprintf("liveness %#08x -> %#08x", uint32(v), ^uint32(v)), nil
}

// dmaWait is how a transfer's end is awaited: an interrupt, or polling the
// command register.
type dmaWait func() error

// dma has the device copy n bytes from src to dst (device addresses: IOVAs
// or guest-physical addresses, and eduBuffer for the device's own buffer).
// edu runs a transfer 100 ms (virtual clock) after it is started.
func dma(m mmio, src, dst uint64, toHost bool, irq bool, wait dmaWait) error {
	if src >= eduDMALimit || dst >= eduDMALimit {
		return fmt.Errorf("DMA %#x -> %#x: beyond edu's 28-bit DMA mask", src, dst)
	}
	cmd := uint32(eduDMAStart)
	if toHost {
		cmd |= eduDMAToHost
	}
	if irq {
		cmd |= eduDMAIRQ
	}
	m.write(eduRegDMASrc, uint32(src))
	m.write(eduRegDMADst, uint32(dst))
	m.write(eduRegDMACount, eduDMALen)
	m.write(eduRegDMACmd, cmd)
	if err := wait(); err != nil {
		return fmt.Errorf("DMA %#x -> %#x: %w", src, dst, err)
	}
	if c := m.read(eduRegDMACmd); c&eduDMAStart != 0 {
		return fmt.Errorf("DMA %#x -> %#x: still running after its end was signalled (command %#x)", src, dst, c)
	}
	return nil
}

// pollDMA waits for the start bit of the command register to clear.
func pollDMA(m mmio, timeout time.Duration) dmaWait {
	return func() error {
		deadline := time.Now().Add(timeout)
		for m.read(eduRegDMACmd)&eduDMAStart != 0 {
			if time.Now().After(deadline) {
				return fmt.Errorf("not done within %s", timeout)
			}
			time.Sleep(time.Millisecond)
		}
		return nil
	}
}

// pattern fills b with bytes that no other buffer of the run holds, so
// that a copy from the wrong place cannot pass for the right one.
func pattern(b []byte, seed uint32) {
	x := seed | 1
	for i := range b {
		// xorshift32
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
}

// compare reports the first difference between got and want.
func compare(got, want []byte) error {
	for i := range want {
		if got[i] != want[i] {
			n := 0
			for j := i; j < len(want); j++ {
				if got[j] != want[j] {
					n++
				}
			}
			return fmt.Errorf("%d of %d bytes differ, the first at offset %d: %#02x, want %#02x", n, len(want), i, got[i], want[i])
		}
	}
	return nil
}
