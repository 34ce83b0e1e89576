package vfiotest

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Emulator plays the kernel's part for a Tree: it answers writes to
// drivers_probe and to each driver's bind, unbind, new_id and remove_id the
// way the PCI core does, honours driver_override, and creates and removes
// /dev/vfio/<group> and vfio-dev/vfioN as vfio drivers take and release
// devices. Each write gets the kernel's answer: ENODEV for an address the
// bus or the driver does not have, EBUSY for a bind to a device that has a
// driver, the driver's probe error (vfio-pci's EBUSY for an SR-IOV physical
// function with VFs enabled, its EINVAL for a bridge, a Device's
// ProbeError), EINVAL for malformed ids, EEXIST and ENODEV for ids already
// added or absent.
//
// Writes reach it two ways, answered by the same code:
//
//   - WriteAttr, for code in the test's process (vfio.WithAttrWriter): the
//     answer is the write's return, and it returns when the kernel's write
//     would, once the driver's remove or probe has run, as on a node.
//   - The files themselves, for programs that open them (an agent binary
//     run against the tree): the write-only attributes are named pipes, so
//     no write is lost however fast writers follow one another. Two
//     differences from the kernel: a write returns before the emulator has
//     answered it, so callers must wait for the result, as code that runs
//     on a node has to anyway to bound a hung driver; and the answer cannot
//     reach the writer, whose write always succeeds (Writes shows it).
//     driver_override is a plain file there, stored as written.
type Emulator struct {
	t *Tree

	mu      sync.Mutex
	attrs   map[string]attr        // write-only attributes, by real path
	dynIDs  map[string][][2]uint16 // driver → ids added through new_id
	pending map[string]bool        // devices whose unbind is under way
	after   map[string][]func()    // writes that wait for a device's unbind
	fifos   []*os.File
	writes  []string
	errs    []error
	closed  bool
	quit    chan struct{} // closed by Close: writes that hang give up
	wg      sync.WaitGroup
}

// An attr is one write-only attribute. answer runs with the emulator's lock
// held and calls reply, also with the lock held, with the write's result
// (nil or a syscall.Errno) when the kernel's write would return: at once,
// later (an unbind waits for the driver's remove; a bind or probe waits for
// an unbind under way), or never (a remove that hangs). tries is how long a
// bind or probe waits for an unbind that may not have been read yet: see
// whenUnbound.
type attr struct {
	rel    string // path under sysfs, as Writes shows it
	split  func(string) []string
	answer func(value string, tries int, reply func(error))
}

var (
	addressRE = regexp.MustCompile(`[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]`)
	idRE      = regexp.MustCompile(`([0-9a-fA-F]{4})\s+([0-9a-fA-F]{4})`)
)

// splitter splits what one read of a pipe returns, which may be several
// writes run together, into the values written.
func splitter(re *regexp.Regexp) func(string) []string {
	return func(data string) []string {
		if vs := re.FindAllString(data, -1); len(vs) > 0 {
			return vs
		}
		return []string{strings.TrimSpace(data)}
	}
}

// Start runs the emulator until Close.
func (t *Tree) Start() (*Emulator, error) {
	e := &Emulator{t: t, attrs: map[string]attr{}, dynIDs: map[string][][2]uint16{},
		pending: map[string]bool{}, after: map[string][]func(){}, quit: make(chan struct{})}
	if err := e.serve(filepath.Join(t.SysfsRoot, "bus/pci/drivers_probe"), splitter(addressRE), e.probe); err != nil {
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
	for name, a := range map[string]struct {
		split  func(string) []string
		answer func(string, int, func(error))
	}{
		"bind":      {splitter(addressRE), func(v string, tries int, reply func(error)) { e.bind(drv, v, tries, reply) }},
		"unbind":    {splitter(addressRE), func(v string, _ int, reply func(error)) { e.unbind(drv, v, reply) }},
		"new_id":    {splitter(idRE), func(v string, _ int, reply func(error)) { e.newID(drv, v, reply) }},
		"remove_id": {splitter(idRE), func(v string, _ int, reply func(error)) { e.removeID(drv, v, reply) }},
	} {
		if err := e.serve(filepath.Join(dir, name), a.split, a.answer); err != nil {
			return err
		}
	}
	return nil
}

// serve answers an attribute: through WriteAttr, and through its pipe,
// read here. Holding the pipe open for reading and writing means writers
// never block on open and the reader never sees end of file.
func (e *Emulator) serve(path string, split func(string) []string, answer func(string, int, func(error))) error {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return fmt.Errorf("vfiotest: serve %q: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("vfiotest: open %q: %w", path, err)
	}
	rel, _ := filepath.Rel(e.t.SysfsRoot, path)
	a := attr{rel: rel, split: split, answer: answer}
	e.attrs[real] = a
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
			for _, v := range a.split(string(buf[:n])) {
				e.mu.Lock()
				i := e.record(a.rel, v)
				a.answer(v, retries, func(err error) { e.answered(i, err) })
				e.mu.Unlock()
			}
		}
	}()
	return nil
}

// WriteAttr writes value to the attribute at path as write(2) does on a
// node, and returns the kernel's answer: nil, or an *fs.PathError with the
// syscall.Errno of the attribute's store function (ENOENT from open for an
// attribute that does not exist). It returns when the kernel's write
// would: an unbind once the driver's remove has run (never while a device
// refuses to let go, until Close), a bind or probe once an unbind under
// way has finished. It is a vfio.AttrWriter.
//
// driver_override is checked as the kernel does (EINVAL from a page on;
// cut at the first newline). Other plain files are written as they are.
func (e *Emulator) WriteAttr(path, value string) error {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		return &fs.PathError{Op: "open", Path: path, Err: err}
	}
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return &fs.PathError{Op: "write", Path: path, Err: errClosed}
	}
	a, ok := e.attrs[real]
	if !ok {
		defer e.mu.Unlock()
		if filepath.Base(real) == "driver_override" {
			if d := e.t.byAddr[filepath.Base(filepath.Dir(real))]; d != nil {
				if err := e.setOverride(d.Address, value); err != nil {
					return &fs.PathError{Op: "write", Path: path, Err: err}
				}
				return nil
			}
		}
		return writeFile(path, value, 0o644)
	}
	i := e.record(a.rel, strings.TrimSpace(value))
	done := make(chan error, 1)
	a.answer(value, 0, func(err error) {
		e.answered(i, err)
		done <- err
	})
	e.mu.Unlock()
	select {
	case err := <-done:
		if err != nil {
			return &fs.PathError{Op: "write", Path: path, Err: err}
		}
		return nil
	case <-e.quit:
		return &fs.PathError{Op: "write", Path: path, Err: errClosed}
	}
}

var errClosed = errors.New("vfiotest: emulator closed")

func (e *Emulator) record(rel, value string) int {
	e.writes = append(e.writes, rel+" "+value)
	return len(e.writes) - 1
}

func (e *Emulator) answered(i int, err error) {
	if err != nil {
		e.writes[i] += ": " + err.Error()
	}
}

// Writes lists the writes to the write-only attributes that the emulator
// has read, in order, each as the attribute's path under sysfs and the
// value: "bus/pci/drivers/vfio-pci/unbind 0000:65:00.0"; a write the kernel
// refuses ends with its error: "...: no such device". A test that must show
// nothing reached the kernel checks that none was added. driver_override,
// a readable attribute, is not listed.
func (e *Emulator) Writes() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.writes)
}

// Close stops the emulator and reports any error it met while answering.
// Writes still waiting for an answer (a remove that hangs) give up.
func (e *Emulator) Close() error {
	e.mu.Lock()
	if !e.closed {
		e.closed = true
		close(e.quit)
		for _, f := range e.fifos {
			f.Close()
		}
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

// pageSize is the size of a sysfs write buffer.
const pageSize = 4096

// setOverride is driver_set_override (drivers/base/driver.c): a value of a
// page less one or more is EINVAL; the override is what comes before the
// first NUL or newline, and none when that is empty. A newline further on
// is no error: the rest is dropped. The file is replaced whole, so that no
// reader sees it half written.
func (e *Emulator) setOverride(addr, value string) error {
	if len(value) >= pageSize-1 {
		return syscall.EINVAL
	}
	value, _, _ = strings.Cut(value, "\x00")
	value, _, _ = strings.Cut(value, "\n")
	if value == "" {
		value = "(null)"
	}
	path := filepath.Join(e.t.busLink(addr), "driver_override")
	tmp, err := os.CreateTemp(e.t.Root, ".driver_override-")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.WriteString(value + "\n")
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp.Name(), 0o644)
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	return err
}

// device is the bus's device of that name, nil for none: the name as
// sysfs_streq compares it, a trailing newline allowed.
func (e *Emulator) device(value string) *Device {
	d, ok := e.t.byAddr[strings.TrimSuffix(value, "\n")]
	if !ok || !e.present(d.Address) {
		return nil
	}
	return d
}

func (e *Emulator) matches(drv string, d *Device) bool {
	if drv == d.NativeDriver {
		return true
	}
	return slices.Contains(e.dynIDs[drv], [2]uint16{d.Vendor, d.DeviceID})
}

// bindable is driver_match_device for the PCI bus: driver_override, when
// set, names the only driver that matches; otherwise the driver's ids.
func (e *Emulator) bindable(drv string, d *Device) bool {
	if ov := e.override(d.Address); ov != "" {
		return ov == drv
	}
	return e.matches(drv, d)
}

// probeError is the driver's probe's answer for the device. vfio-pci and
// its variants (vfio_pci_core_register_device) take only devices with a
// normal header, EINVAL for a bridge, and refuse an SR-IOV physical
// function with VFs enabled, EBUSY ("Cannot bind to PF with SR-IOV
// enabled"); other drivers fail with the device's ProbeError.
func (e *Emulator) probeError(drv string, d *Device) error {
	if isVFIO(drv) {
		switch {
		case d.Class>>8 == ClassBridge>>8 || d.Class>>8 == classCardBus>>8:
			return syscall.EINVAL
		case d.NumVFs > 0:
			return syscall.EBUSY
		}
		return nil
	}
	if d.ProbeError != 0 {
		return d.ProbeError
	}
	return nil
}

// classCardBus is a CardBus bridge, the other header that is not normal.
const classCardBus = 0x060700

// probe is drivers_probe (drivers_probe_store): ENODEV for an address the
// bus does not have; otherwise the write succeeds, whatever the probe
// does. A device with a driver is left alone; one without is offered to
// the driver its driver_override names, or to each driver that matches
// until one's probe succeeds. Probe errors are not returned: the device is
// left without a driver.
func (e *Emulator) probe(value string, tries int, reply func(error)) {
	d := e.device(value)
	if d == nil {
		reply(syscall.ENODEV)
		return
	}
	e.whenUnbound(d.Address, tries, func() {
		e.probeOne(d)
		reply(nil)
	}, func() { reply(nil) })
}

func (e *Emulator) probeOne(d *Device) {
	if ov := e.override(d.Address); ov != "" {
		if _, err := os.Stat(e.t.driverDir(ov)); err == nil && e.probeError(ov, d) == nil {
			e.fail(e.t.attach(d.Address, ov))
		}
		return
	}
	entries, _ := os.ReadDir(filepath.Join(e.t.SysfsRoot, "bus/pci/drivers"))
	for _, ent := range entries {
		if e.matches(ent.Name(), d) && e.probeError(ent.Name(), d) == nil {
			e.fail(e.t.attach(d.Address, ent.Name()))
			return
		}
	}
}

// retries bounds how long a probe or bind read from a pipe waits for an
// unbind written just before it: see whenUnbound.
const retries = 8

// whenUnbound runs op once the device has no driver, or busy if it keeps
// one. The kernel finishes an unbind before the write returns, and a bind
// or probe written meanwhile waits for it (the device lock); a pending
// unbind is waited for here too. Through the pipes an unbind written
// before may also still be unread in its own pipe, so a write read from a
// pipe retries tries times before it finds the device busy.
func (e *Emulator) whenUnbound(addr string, tries int, op, busy func()) {
	switch {
	case e.closed:
	case e.pending[addr]:
		e.after[addr] = append(e.after[addr], func() { e.whenUnbound(addr, 0, op, busy) })
	case e.t.driverOf(addr) == "":
		op()
	case tries > 0:
		e.wg.Add(1)
		time.AfterFunc(time.Duration(retries-tries+1)*time.Millisecond, func() {
			defer e.wg.Done()
			e.mu.Lock()
			defer e.mu.Unlock()
			e.whenUnbound(addr, tries-1, op, busy)
		})
	default:
		busy()
	}
}

// bind is drivers/<drv>/bind (bind_store): ENODEV for an address the bus
// does not have or a device the driver does not match; EBUSY for a device
// that has a driver; the probe's error; otherwise the driver takes it.
func (e *Emulator) bind(drv, value string, tries int, reply func(error)) {
	d := e.device(value)
	if d == nil {
		reply(syscall.ENODEV)
		return
	}
	e.whenUnbound(d.Address, tries, func() {
		if !e.bindable(drv, d) {
			reply(syscall.ENODEV)
			return
		}
		if err := e.probeError(drv, d); err != nil {
			reply(err)
			return
		}
		e.fail(e.t.attach(d.Address, drv))
		reply(nil)
	}, func() {
		if !e.bindable(drv, d) {
			reply(syscall.ENODEV)
			return
		}
		reply(syscall.EBUSY)
	})
}

// unbind is drivers/<drv>/unbind (unbind_store): ENODEV for a device the
// driver does not hold; otherwise the driver's remove runs, taking the
// device's UnbindDelay, or never finishing when it refuses, and the write
// returns when it has. A second unbind meanwhile waits for the first.
func (e *Emulator) unbind(drv, value string, reply func(error)) {
	d := e.device(value)
	if d == nil || e.t.driverOf(d.Address) != drv {
		reply(syscall.ENODEV)
		return
	}
	addr := d.Address
	if e.pending[addr] {
		e.after[addr] = append(e.after[addr], func() { reply(nil) })
		return
	}
	e.override(addr)
	if d.RefuseUnbind {
		e.pending[addr] = true
		return
	}
	if d.UnbindDelay <= 0 {
		e.fail(e.t.detach(addr, drv))
		reply(nil)
		return
	}
	e.pending[addr] = true
	e.wg.Add(1)
	time.AfterFunc(d.UnbindDelay, func() {
		defer e.wg.Done()
		e.mu.Lock()
		defer e.mu.Unlock()
		delete(e.pending, addr)
		if e.closed {
			return
		}
		if e.t.driverOf(addr) == drv {
			e.fail(e.t.detach(addr, drv))
		}
		reply(nil)
		queued := e.after[addr]
		delete(e.after, addr)
		for _, op := range queued {
			op()
		}
	})
}

// parseID reads "vendor device" in hex, as new_id_store's sscanf does
// ("%x %x ...", "0x" allowed): the first two fields must parse. Further
// fields (subsystem ids, class) are accepted and not modelled.
func parseID(value string) ([2]uint16, bool) {
	f := strings.Fields(value)
	if len(f) < 2 {
		return [2]uint16{}, false
	}
	var id [2]uint16
	for i := range 2 {
		h := strings.TrimPrefix(strings.ToLower(f[i]), "0x")
		n, err := strconv.ParseUint(h, 16, 16)
		if err != nil {
			return [2]uint16{}, false
		}
		id[i] = uint16(n)
	}
	return id, true
}

// newID is new_id (new_id_store): EINVAL for text that is no "vendor
// device"; EEXIST for an id the driver matches already (here: one added
// before; the drivers' own id tables are not modelled for this). Adding an
// id probes the unbound devices it matches, as driver_attach does.
func (e *Emulator) newID(drv, value string, reply func(error)) {
	id, ok := parseID(value)
	if !ok {
		reply(syscall.EINVAL)
		return
	}
	if slices.Contains(e.dynIDs[drv], id) {
		reply(syscall.EEXIST)
		return
	}
	e.dynIDs[drv] = append(e.dynIDs[drv], id)
	for i := range e.t.node.Devices {
		d := &e.t.node.Devices[i]
		if d.Vendor != id[0] || d.DeviceID != id[1] || !e.present(d.Address) || e.t.driverOf(d.Address) != "" {
			continue
		}
		if e.bindable(drv, d) && e.probeError(drv, d) == nil {
			e.fail(e.t.attach(d.Address, drv))
		}
	}
	reply(nil)
}

// removeID is remove_id (remove_id_store): EINVAL for malformed text,
// ENODEV for an id that was not added.
func (e *Emulator) removeID(drv, value string, reply func(error)) {
	id, ok := parseID(value)
	if !ok {
		reply(syscall.EINVAL)
		return
	}
	i := slices.Index(e.dynIDs[drv], id)
	if i < 0 {
		reply(syscall.ENODEV)
		return
	}
	e.dynIDs[drv] = slices.Delete(e.dynIDs[drv], i, i+1)
	reply(nil)
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
