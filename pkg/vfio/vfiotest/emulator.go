package vfiotest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Emulator plays the kernel's part for a Tree: it answers writes to
// drivers_probe and to each driver's bind, unbind, new_id and remove_id the
// way the PCI core does, honours driver_override, and creates and removes
// /dev/vfio/<group> and vfio-dev/vfioN as vfio drivers take and release
// devices.
//
// The write-only attributes are named pipes, so no write is lost however fast
// writers follow one another. The one difference from the kernel: a write
// returns before the driver has finished, so callers must wait for the
// result, as code that runs on a node has to anyway to bound a hung driver.
type Emulator struct {
	t *Tree

	mu      sync.Mutex
	dynIDs  map[string][][2]uint16 // driver → ids added through new_id
	pending map[string]bool        // devices whose unbind is under way
	after   map[string][]func()    // writes that wait for a device's unbind
	fifos   []*os.File
	writes  []string
	errs    []error
	closed  bool
	wg      sync.WaitGroup
}

var (
	addressRE = regexp.MustCompile(`[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]`)
	idRE      = regexp.MustCompile(`([0-9a-fA-F]{4})\s+([0-9a-fA-F]{4})`)
)

// Start runs the emulator until Close.
func (t *Tree) Start() (*Emulator, error) {
	e := &Emulator{t: t, dynIDs: map[string][][2]uint16{}, pending: map[string]bool{}, after: map[string][]func(){}}
	if err := e.serve(filepath.Join(t.SysfsRoot, "bus/pci/drivers_probe"), e.probe); err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(filepath.Join(t.SysfsRoot, "bus/pci/drivers"))
	if err != nil {
		e.Close()
		return nil, err
	}
	for _, ent := range entries {
		if err := e.serveDriver(ent.Name()); err != nil {
			e.Close()
			return nil, err
		}
	}
	return e, nil
}

// LoadDriver registers a driver on the bus, as loading its module does.
func (e *Emulator) LoadDriver(name string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if _, err := os.Stat(e.t.driverDir(name)); err == nil {
		return nil
	}
	if err := e.t.addDriver(name); err != nil {
		return err
	}
	return e.serveDriver(name)
}

func (e *Emulator) serveDriver(drv string) error {
	dir := e.t.driverDir(drv)
	handlers := map[string]func(string){
		"bind":      func(s string) { e.bind(drv, s) },
		"unbind":    func(s string) { e.unbind(drv, s) },
		"new_id":    func(s string) { e.newID(drv, s, true) },
		"remove_id": func(s string) { e.newID(drv, s, false) },
	}
	for name, h := range handlers {
		if err := e.serve(filepath.Join(dir, name), h); err != nil {
			return err
		}
	}
	return nil
}

// serve reads writes from a pipe. Holding it open for reading and writing
// means writers never block on open and the reader never sees end of file.
func (e *Emulator) serve(path string, handle func(string)) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("vfiotest: open %q: %w", path, err)
	}
	e.fifos = append(e.fifos, f)
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		buf := make([]byte, 4096)
		for {
			n, err := f.Read(buf)
			if err != nil {
				return
			}
			rel, _ := filepath.Rel(e.t.SysfsRoot, path)
			e.mu.Lock()
			e.writes = append(e.writes, rel+" "+strings.TrimSpace(string(buf[:n])))
			e.mu.Unlock()
			handle(string(buf[:n]))
		}
	}()
	return nil
}

// Writes lists the writes the emulator has answered, in order, each as the
// attribute's path under sysfs and the value: "bus/pci/drivers/vfio-pci/unbind
// 0000:65:00.0". A test that must show nothing reached the kernel checks that
// none was added.
func (e *Emulator) Writes() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.writes)
}

// Close stops the emulator and reports any error it met while answering.
func (e *Emulator) Close() error {
	e.mu.Lock()
	e.closed = true
	for _, f := range e.fifos {
		f.Close()
	}
	e.mu.Unlock()
	e.wg.Wait()
	e.mu.Lock()
	defer e.mu.Unlock()
	return errors.Join(e.errs...)
}

func (e *Emulator) fail(err error) {
	if err != nil {
		e.errs = append(e.errs, err)
	}
}

// override reads driver_override. A cleared override ("echo >") is stored
// back as the kernel prints it, "(null)". An empty file is a write that
// has truncated but not yet written: read as none and left alone.
func (e *Emulator) override(addr string) string {
	path := filepath.Join(e.t.busLink(addr), "driver_override")
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	v := strings.TrimSpace(string(b))
	if v == "" && len(b) > 0 {
		e.fail(os.WriteFile(path, []byte("(null)\n"), 0o644))
	}
	if v == "(null)" {
		v = ""
	}
	return v
}

func (e *Emulator) matches(drv string, d *Device) bool {
	if drv == d.NativeDriver {
		return true
	}
	for _, id := range e.dynIDs[drv] {
		if id[0] == d.Vendor && id[1] == d.DeviceID {
			return true
		}
	}
	return false
}

// probe is drivers_probe: attach the first driver that matches, where
// driver_override, when set, is the only one that can.
func (e *Emulator) probe(data string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, addr := range addressRE.FindAllString(data, -1) {
		e.whenUnbound(addr, retries, func() { e.probeOne(addr) })
	}
}

// retries bounds how long a probe or bind waits for an unbind written just
// before it: see whenUnbound.
const retries = 8

// whenUnbound runs op once the device has no driver. The kernel finishes an
// unbind before the write returns, so a writer's next write always finds
// the device free; here the unbind may still be running (a slow device) or
// be unread in its own pipe, so op waits for it, and gives up (as the
// kernel's write would find the device busy) when no unbind comes.
func (e *Emulator) whenUnbound(addr string, tries int, op func()) {
	switch {
	case e.t.driverOf(addr) == "":
		op()
	case e.pending[addr]:
		e.after[addr] = append(e.after[addr], op)
	case tries > 0 && !e.closed:
		e.wg.Add(1)
		time.AfterFunc(time.Duration(retries-tries+1)*time.Millisecond, func() {
			defer e.wg.Done()
			e.mu.Lock()
			defer e.mu.Unlock()
			e.whenUnbound(addr, tries-1, op)
		})
	}
}

func (e *Emulator) probeOne(addr string) {
	d, ok := e.t.byAddr[addr]
	if !ok || e.t.driverOf(addr) != "" || !e.present(addr) {
		return
	}
	if ov := e.override(addr); ov != "" {
		if _, err := os.Stat(e.t.driverDir(ov)); err == nil {
			e.fail(e.t.attach(addr, ov))
		}
		return
	}
	entries, _ := os.ReadDir(filepath.Join(e.t.SysfsRoot, "bus/pci/drivers"))
	for _, ent := range entries {
		if e.matches(ent.Name(), d) {
			e.fail(e.t.attach(addr, ent.Name()))
			return
		}
	}
}

// bind is drivers/<drv>/bind: only an unbound device that the driver
// matches, or that driver_override names it for, is taken.
func (e *Emulator) bind(drv, data string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, addr := range addressRE.FindAllString(data, -1) {
		e.whenUnbound(addr, retries, func() { e.bindOne(drv, addr) })
	}
}

func (e *Emulator) bindOne(drv, addr string) {
	d, ok := e.t.byAddr[addr]
	if !ok || e.t.driverOf(addr) != "" || !e.present(addr) {
		return
	}
	ov := e.override(addr)
	if ov == drv || (ov == "" && e.matches(drv, d)) {
		e.fail(e.t.attach(addr, drv))
	}
}

// unbind is drivers/<drv>/unbind: the driver's remove runs, taking the
// device's UnbindDelay, or never finishing when it refuses.
func (e *Emulator) unbind(drv, data string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, addr := range addressRE.FindAllString(data, -1) {
		d, ok := e.t.byAddr[addr]
		if !ok || e.t.driverOf(addr) != drv || e.pending[addr] {
			continue
		}
		e.override(addr)
		if d.RefuseUnbind {
			e.pending[addr] = true
			continue
		}
		if d.UnbindDelay <= 0 {
			e.fail(e.t.detach(addr, drv))
			continue
		}
		e.pending[addr] = true
		e.wg.Add(1)
		time.AfterFunc(d.UnbindDelay, func() {
			defer e.wg.Done()
			e.mu.Lock()
			defer e.mu.Unlock()
			delete(e.pending, addr)
			if !e.closed && e.t.driverOf(addr) == drv {
				e.fail(e.t.detach(addr, drv))
			}
			queued := e.after[addr]
			delete(e.after, addr)
			for _, op := range queued {
				op()
			}
		})
	}
}

// newID is new_id and remove_id: "vendor device" in hex. Adding an id probes
// the unbound devices it matches, as the kernel does.
func (e *Emulator) newID(drv, data string, add bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, m := range idRE.FindAllStringSubmatch(data, -1) {
		v, _ := strconv.ParseUint(m[1], 16, 16)
		dv, _ := strconv.ParseUint(m[2], 16, 16)
		id := [2]uint16{uint16(v), uint16(dv)}
		ids := e.dynIDs[drv]
		for i, have := range ids {
			if have == id {
				ids = append(ids[:i], ids[i+1:]...)
				break
			}
		}
		if !add {
			e.dynIDs[drv] = ids
			continue
		}
		e.dynIDs[drv] = append(ids, id)
		for _, d := range e.t.node.Devices {
			if d.Vendor == id[0] && d.DeviceID == id[1] && e.t.driverOf(d.Address) == "" {
				if ov := e.override(d.Address); ov == "" || ov == drv {
					e.fail(e.t.attach(d.Address, drv))
				}
			}
		}
	}
}

func (e *Emulator) present(addr string) bool {
	_, err := os.Lstat(e.t.busLink(addr))
	return err == nil
}

// UnloadDriver takes a driver off the bus, as rmmod does; it fails while
// the driver holds a device.
func (e *Emulator) UnloadDriver(name string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, d := range e.t.node.Devices {
		if e.t.driverOf(d.Address) == name {
			return fmt.Errorf("vfiotest: unload %s: it holds %s", name, d.Address)
		}
	}
	return e.t.removeDriver(name)
}

// RemoveDevice hot-unplugs a device while the emulator runs.
func (e *Emulator) RemoveDevice(addr string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.t.RemoveDevice(addr)
}
