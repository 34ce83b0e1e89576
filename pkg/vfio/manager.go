package vfio

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gpu-sandbox/gpu-sandbox/internal/faultinject"
)

// Defaults of a Manager.
const (
	DefaultDevRoot  = "/dev"
	DefaultHostRoot = "/"
	DefaultTimeout  = 10 * time.Second
)

// ModuleLoader loads a kernel module by name.
type ModuleLoader interface {
	LoadModule(ctx context.Context, name string) error
}

// AttrWriter writes one value to a sysfs attribute and returns what the
// kernel answers, as write(2) on the opened attribute does: nil, or the
// store function's errno (EBUSY, ENODEV, EINVAL...) in an *fs.PathError.
type AttrWriter interface {
	WriteAttr(path, value string) error
}

// fileWriter is the node's AttrWriter: the attribute's file, opened and
// written.
type fileWriter struct{}

func (fileWriter) WriteAttr(path, value string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(value)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Manager binds IOMMU groups to VFIO and gives them back.
type Manager struct {
	sysfs    *Sysfs
	attrs    AttrWriter
	devRoot  string
	hostRoot string
	state    stateStore
	timeout  time.Duration
	procRoot string
	loader   ModuleLoader
	release  string
	dryRun   bool
}

// Option configures a Manager.
type Option func(*Manager)

// WithSysfsRoot sets where sysfs is read and written. Default: DefaultSysfsRoot.
func WithSysfsRoot(root string) Option { return func(m *Manager) { m.sysfs = NewSysfs(root) } }

// WithDevRoot sets where /dev/vfio is looked for. Default: DefaultDevRoot.
func WithDevRoot(root string) Option { return func(m *Manager) { m.devRoot = root } }

// WithHostRoot sets the host's root file system, under which
// lib/modules/<release>/modules.alias is read. Default: DefaultHostRoot.
func WithHostRoot(root string) Option { return func(m *Manager) { m.hostRoot = root } }

// WithProcRoot sets where the processes that may hold devices open are
// listed; the host's /proc (the agent in the host's PID namespace) is what
// makes the in-use check see every VM. Default: DefaultProcRoot.
func WithProcRoot(root string) Option { return func(m *Manager) { m.procRoot = root } }

// WithTimeout sets how long one device may take to change driver.
// Default: DefaultTimeout.
func WithTimeout(d time.Duration) Option { return func(m *Manager) { m.timeout = d } }

// WithModuleLoader loads drivers that are not registered yet. Default: none,
// and binding to a driver that is not loaded fails with ErrDriverNotLoaded.
func WithModuleLoader(l ModuleLoader) Option { return func(m *Manager) { m.loader = l } }

// WithKernelRelease sets the release whose modules.alias is read.
// Default: the running kernel's (uname -r).
func WithKernelRelease(r string) Option { return func(m *Manager) { m.release = r } }

// WithDryRun makes Bind and Unbind report what they would do and change nothing.
// Default: false.
func WithDryRun(dry bool) Option { return func(m *Manager) { m.dryRun = dry } }

// WithAttrWriter replaces how sysfs attributes are written. It exists for
// fakes: a fake sysfs made of files cannot fail a write as the kernel does,
// and vfiotest's Emulator, given here, answers with the kernel's errors.
// Default: the attribute's file is opened and written, as on a node.
func WithAttrWriter(w AttrWriter) Option { return func(m *Manager) { m.attrs = w } }

// NewManager returns a Manager for the node's sysfs, or the tree the options
// name. stateDir is where it records the driver each device had before it
// was bound, one file per device, for Unbind to give it back: it must
// outlive the process (the GPU Operator's agents use /run/nvidia/...).
func NewManager(stateDir string, opts ...Option) *Manager {
	m := &Manager{
		sysfs:    NewSysfs(DefaultSysfsRoot),
		attrs:    fileWriter{},
		devRoot:  DefaultDevRoot,
		hostRoot: DefaultHostRoot,
		procRoot: DefaultProcRoot,
		state:    stateStore{dir: stateDir},
		timeout:  DefaultTimeout,
	}
	for _, o := range opts {
		o(m)
	}
	if m.release == "" {
		var u unix.Utsname
		if unix.Uname(&u) == nil {
			m.release = unix.ByteSliceToString(u.Release[:])
		}
	}
	return m
}

// Sysfs is the reader the Manager uses.
func (m *Manager) Sysfs() *Sysfs { return m.sysfs }

// Action is what happened to a device.
type Action string

// Actions reported in an Outcome.
const (
	ActionBound     Action = "bound"     // given to a vfio driver
	ActionUnbound   Action = "unbound"   // taken from its vfio driver
	ActionUnchanged Action = "unchanged" // already where it should be
	ActionFailed    Action = "failed"    // tried and failed; see Err
	ActionSkipped   Action = "skipped"   // not touched because its group failed
	ActionPlanned   Action = "planned"   // dry run: would change
	ActionRefused   Action = "refused"   // not touched: a process holds its group; see Err
	ActionLeft      Action = "left"      // not touched: this package did not bind it; see Warning
)

// Outcome is the result for one device.
type Outcome struct {
	Address string
	Group   int
	Role    Role
	Action  Action
	// From and To are the drivers before and after ("" for none).
	From, To string
	Err      error
	// Warning explains a result that succeeded in a degraded way.
	Warning string
}

// Result holds one Outcome per member of a plan, sorted by address.
type Result struct {
	Outcomes []Outcome
}

// Err joins the errors of every failed or skipped device.
func (r *Result) Err() error {
	var errs []error
	seen := map[string]bool{}
	for _, o := range r.Outcomes {
		if o.Err != nil && !seen[o.Err.Error()] {
			seen[o.Err.Error()] = true
			errs = append(errs, o.Err)
		}
	}
	return errors.Join(errs...)
}

// Count returns how many outcomes have the action.
func (r *Result) Count(a Action) int {
	n := 0
	for _, o := range r.Outcomes {
		if o.Action == a {
			n++
		}
	}
	return n
}

// Bind gives every viable group of the plan to VFIO, groups in parallel.
// It fails before touching anything when the node has no IOMMU or a needed
// driver cannot be loaded; otherwise failures are per group in the Result,
// and a group that fails part-way is returned to where it was. A group a
// process still uses through its host driver (HostHolders) is refused
// whole (ActionRefused, ErrInUse) and not touched.
func (m *Manager) Bind(ctx context.Context, p *Plan) (*Result, error) {
	if n, err := m.sysfs.IOMMUGroupCount(); err != nil {
		return nil, err
	} else if n == 0 {
		return nil, ErrNoIOMMU
	}
	m.state.clean()
	aliasFile := filepath.Join(m.hostRoot, "lib", "modules", m.release, "modules.alias")
	aliases, err := readVFIOAliases(aliasFile)
	if err != nil {
		return nil, err
	}
	targets := map[string]string{}
	modules := map[string]string{}
	for _, g := range p.Groups {
		if g.Err != nil {
			continue
		}
		for _, mem := range g.Members {
			drv, mod := vfioVariant(aliases, mem.Modalias)
			targets[mem.Address] = drv
			modules[drv] = mod
		}
	}
	if !m.dryRun {
		for _, drv := range slices.Sorted(maps.Keys(modules)) {
			if err := m.ensureDriver(ctx, drv, modules[drv]); err != nil {
				return nil, err
			}
		}
	}
	var held map[int][]Holder
	var heldErr error
	if !m.dryRun {
		held, heldErr = m.HostHolders(p)
	}
	return m.eachGroup(p, func(g *Group) []Outcome {
		if err := hostInUse(g, held, heldErr); err != nil {
			out := make([]Outcome, len(g.Members))
			for i, mem := range g.Members {
				out[i] = Outcome{Address: mem.Address, Group: g.ID, Role: mem.Role, Action: ActionRefused,
					From: mem.Driver, To: mem.Driver, Err: err}
			}
			return out
		}
		return m.bindGroup(ctx, g, targets)
	}), nil
}

// hostInUse is the reason not to take the group from its host drivers: a
// process uses a member through them, or the processes could not be checked.
func hostInUse(g *Group, held map[int][]Holder, heldErr error) error {
	if g.Err != nil {
		return nil // reported as skipped
	}
	if heldErr != nil {
		return fmt.Errorf("bind iommu group %d: cannot tell whether a process uses it through its host driver: %w", g.ID, heldErr)
	}
	hs := held[g.ID]
	if len(hs) == 0 {
		return nil
	}
	return fmt.Errorf("bind iommu group %d: %w: %s; the host driver cannot let the device go while it is open: stop it first",
		g.ID, ErrInUse, holderList(hs))
}

func holderList(hs []Holder) string {
	desc := make([]string, len(hs))
	for i, h := range hs {
		desc[i] = h.String()
	}
	return strings.Join(desc, ", ")
}

// UnbindOptions tune Unbind. The zero value gives back only devices this
// package bound and that no process holds.
type UnbindOptions struct {
	// Force also gives back devices that a process holds open, which pulls
	// them out of a running VM (the kernel asks the VMM to release them and
	// waits for it), and devices this package has no record of binding,
	// which are left without a driver. Default false: such devices are
	// reported (ActionRefused, ActionLeft) and not touched.
	Force bool
}

// Unbind takes the members of the plan that a vfio driver holds back from
// it and gives each to the driver recorded when this package bound it.
//
// Before any write, the host's processes are checked (WithProcRoot): a group
// whose /dev/vfio node or vfio cdev a process holds open is refused whole,
// naming the process, and none of its members is touched. Devices without a
// record (bound by vfio-pci.ids= or by hand) are left as they are. A device
// with a record that lost its driver since (an unbind that the kernel
// finished late) is given back to its recorded driver.
func (m *Manager) Unbind(ctx context.Context, p *Plan, opts UnbindOptions) *Result {
	m.state.clean()
	var held map[int][]Holder
	var heldErr error
	if !opts.Force && !m.dryRun {
		held, heldErr = m.Holders(p)
	}
	return m.eachGroup(p, func(g *Group) []Outcome {
		out := make([]Outcome, 0, len(g.Members))
		if err := m.inUse(g, held, heldErr); err != nil {
			for _, mem := range g.Members {
				out = append(out, Outcome{Address: mem.Address, Group: g.ID, Role: mem.Role, Action: ActionRefused,
					From: mem.Driver, To: mem.Driver, Err: err})
			}
			return out
		}
		for _, mem := range g.Members {
			out = append(out, m.unbindDevice(ctx, g.ID, mem, opts.Force))
		}
		return out
	})
}

// inUse is the reason not to touch the group: a process holds it, or the
// processes could not be checked.
func (m *Manager) inUse(g *Group, held map[int][]Holder, heldErr error) error {
	if heldErr != nil {
		return fmt.Errorf("unbind iommu group %d: cannot tell whether a process holds it: %w", g.ID, heldErr)
	}
	hs := held[g.ID]
	if len(hs) == 0 {
		return nil
	}
	return fmt.Errorf("unbind iommu group %d: %w: %s; stop it first (or --force, which takes the device from a running VM)",
		g.ID, ErrInUse, holderList(hs))
}

func (m *Manager) eachGroup(p *Plan, f func(*Group) []Outcome) *Result {
	results := make([][]Outcome, len(p.Groups))
	var wg sync.WaitGroup
	for i, g := range p.Groups {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = f(g)
		}()
	}
	wg.Wait()
	r := &Result{}
	for _, out := range results {
		r.Outcomes = append(r.Outcomes, out...)
	}
	slices.SortFunc(r.Outcomes, func(a, b Outcome) int { return strings.Compare(a.Address, b.Address) })
	return r
}

func (m *Manager) bindGroup(ctx context.Context, g *Group, targets map[string]string) []Outcome {
	out := make([]Outcome, len(g.Members))
	for i, mem := range g.Members {
		out[i] = Outcome{Address: mem.Address, Group: g.ID, Role: mem.Role, From: mem.Driver, To: mem.Driver}
	}
	if g.Err != nil {
		for i := range out {
			out[i].Action, out[i].Err = ActionSkipped, g.Err
		}
		return out
	}
	for i, mem := range g.Members {
		if mem.BoundToVFIO() {
			out[i].Action = ActionUnchanged
			continue
		}
		if m.dryRun {
			out[i].Action, out[i].To = ActionPlanned, targets[mem.Address]
			continue
		}
		if err := m.bindDevice(ctx, mem.Device, targets[mem.Address]); err != nil {
			out[i].Action, out[i].Err = ActionFailed, err
			out[i].To = m.currentDriver(mem.Address)
			m.rollback(ctx, g, out[:i], err)
			for j := i + 1; j < len(out); j++ {
				out[j].Action = ActionSkipped
				out[j].Err = fmt.Errorf("bind %s: skipped, group %d failed: %w", out[j].Address, g.ID, err)
			}
			return out
		}
		out[i].Action, out[i].To = ActionBound, targets[mem.Address]
	}
	if m.dryRun {
		return out
	}
	// The group is usable once the kernel made it openable: through the
	// group interface (class/vfio/<group>, with /dev/vfio/<group>) or,
	// where the kernel has only iommufd, through every function's cdev.
	// Read in sysfs, not in /dev, which a container may only have a copy of.
	wctx, cancel := context.WithTimeout(ctx, m.timeout)
	err := m.waitFor(wctx, func() (bool, error) { return m.groupOpenable(g), nil })
	cancel()
	if err != nil {
		err = fmt.Errorf("bind iommu group %d: neither /dev/vfio/%d nor a vfio cdev for every function appeared: %w", g.ID, g.ID, err)
		m.rollback(ctx, g, out, err)
		for i := range out {
			out[i].Action, out[i].Err = ActionFailed, err
		}
	}
	return out
}

// groupOpenable reports whether a VM can open the group now, in either mode.
func (m *Manager) groupOpenable(g *Group) bool {
	if m.sysfs.GroupReady(g.ID) {
		return true
	}
	for _, mem := range g.Members {
		d, err := m.sysfs.Device(mem.Address)
		if err != nil || d.VFIODevice == "" {
			return false
		}
	}
	return true
}

// rollback gives the devices this call bound back to their drivers, so that a
// group is either wholly given to VFIO or left as it was. It runs to the end
// whatever became of the caller's context (a SIGTERM, a deadline): each
// device still has its own timeout.
func (m *Manager) rollback(ctx context.Context, g *Group, done []Outcome, cause error) {
	ctx = context.WithoutCancel(ctx)
	for i := range done {
		if done[i].Action != ActionBound {
			continue
		}
		o := m.unbindDevice(ctx, g.ID, Member{Device: &Device{Address: done[i].Address}}, false)
		done[i].Action = ActionFailed
		done[i].To = m.currentDriver(done[i].Address)
		done[i].Err = fmt.Errorf("bind %s: rolled back, group %d failed: %w", done[i].Address, g.ID, cause)
		if o.Err != nil {
			done[i].Err = fmt.Errorf("bind %s: group %d failed (%w) and rollback failed: %w", done[i].Address, g.ID, cause, o.Err)
		}
	}
}

// currentDriver reads the device's driver now, for outcomes that must say
// what really happened.
func (m *Manager) currentDriver(address string) string {
	d, _ := linkBase(m.sysfs.DevicePath(address), "driver")
	return d
}

func (m *Manager) bindDevice(ctx context.Context, d *Device, target string) error {
	ctx, cancel := context.WithTimeout(ctx, m.timeout)
	defer cancel()
	fail := func(step string, err error) error {
		return fmt.Errorf("bind %s to %s: %s: %w", d.Address, target, step, err)
	}
	if err := ctx.Err(); err != nil {
		return fail("not started", err)
	}

	rec := record{Address: d.Address, Driver: d.Driver, BoundTo: target}
	if d.Driver != "" {
		// The module, from the driver's own link: names differ (xhci_hcd
		// is xhci_pci's) and cannot be guessed when it must be loaded again.
		rec.Module, _ = linkBase(m.sysfs.DriverPath(d.Driver), "module")
	}
	if old, err := m.state.load(d.Address); err == nil && d.Driver == "" {
		// A run that died between unbind and probe left the device driverless;
		// the driver it had is the one recorded then.
		rec.Driver, rec.Module = old.Driver, old.Module
	}
	if err := m.state.save(rec); err != nil {
		return fail("record previous driver", err)
	}
	faultinject.Point("vfio: recorded " + d.Address)
	devDir := m.sysfs.DevicePath(d.Address)
	if err := m.writeAttr(ctx, filepath.Join(devDir, "driver_override"), target); err != nil {
		m.restoreOverride(d)
		_ = m.state.remove(d.Address)
		return fail("set driver_override", err)
	}
	if d.Driver != "" {
		if err := m.unbindFrom(ctx, d.Driver, d.Address); err != nil {
			m.restoreOverride(d)
			if m.currentDriver(d.Address) == d.Driver {
				_ = m.state.remove(d.Address)
			}
			return fail(fmt.Sprintf("unbind from %s", d.Driver), err)
		}
	}
	faultinject.Point("vfio: unbound " + d.Address)
	err := m.writeAttr(ctx, filepath.Join(m.sysfs.Root(), "bus", "pci", "drivers_probe"), d.Address)
	if err == nil {
		err = m.waitDriver(ctx, d.Address, target)
	}
	faultinject.Point("vfio: probed " + d.Address)
	if err != nil {
		err = fail("probe", err)
		// The device left its driver for nothing: give it back, on a
		// context of its own, so that no function stays driverless with
		// the vfio override set.
		if o := m.unbindDevice(context.WithoutCancel(ctx), -1, Member{Device: &Device{Address: d.Address}}, false); o.Err != nil {
			err = fmt.Errorf("%w; giving it back failed: %w", err, o.Err)
		}
		return err
	}
	return nil
}

// unbindDevice gives one device back to the driver recorded when it was
// bound. Without a record it is left alone, unless force (then it is left
// without a driver).
func (m *Manager) unbindDevice(ctx context.Context, group int, mem Member, force bool) Outcome {
	o := Outcome{Address: mem.Address, Group: group, Role: mem.Role, Action: ActionUnchanged}
	// Read afresh: the plan may predate a bind made since.
	d, err := m.sysfs.Device(mem.Address)
	if err != nil {
		o.Action, o.Err = ActionFailed, fmt.Errorf("unbind %s: %w", mem.Address, err)
		return o
	}
	o.From, o.To = d.Driver, d.Driver
	rec, recErr := m.state.load(d.Address)
	switch {
	case recErr == nil && d.Driver == "":
		// Its vfio driver let go after an earlier call gave up waiting:
		// finish the job that call started.
	case !d.BoundToVFIO():
		if recErr == nil && !m.dryRun {
			// Someone gave it back already; the record is stale.
			if err := m.state.remove(d.Address); err != nil {
				o.Warning = err.Error()
			}
		}
		return o
	case recErr != nil && !force:
		o.Action = ActionLeft
		o.Warning = fmt.Sprintf("%v: not bound by vfio-manager (vfio-pci.ids= on the kernel command line, or by hand); left on %s (--force gives it back without a driver)", recErr, d.Driver)
		return o
	case recErr != nil:
		rec = record{}
		o.Warning = fmt.Sprintf("%v: leaving %s without a driver", recErr, d.Address)
	}
	o.To = rec.Driver
	if m.dryRun {
		o.Action = ActionPlanned
		return o
	}
	ctx, cancel := context.WithTimeout(ctx, m.timeout)
	defer cancel()
	fail := func(step string, err error) Outcome {
		o.Action = ActionFailed
		o.To = m.currentDriver(d.Address)
		o.Err = fmt.Errorf("unbind %s from %s: %s: %w", d.Address, orNone(d.Driver), step, err)
		return o
	}
	// The override names the recorded driver while the device is given
	// back: a driver whose id table does not match (pci-stub, a driver
	// bound by new_id) only takes a device through driver_override.
	override := filepath.Join(m.sysfs.DevicePath(d.Address), "driver_override")
	if err := m.writeAttr(ctx, override, rec.Driver+"\n"); err != nil {
		m.restoreOverride(d)
		return fail("set driver_override", err)
	}
	if d.Driver != "" {
		if err := m.unbindFrom(ctx, d.Driver, d.Address); err != nil {
			m.restoreOverride(d)
			return fail("unbind", err)
		}
	}
	if rec.Driver != "" {
		module := rec.Module
		if module == "" {
			module = moduleOf(rec.Driver)
		}
		err := m.ensureDriver(ctx, rec.Driver, module)
		if err == nil {
			err = m.writeAttr(ctx, filepath.Join(m.sysfs.DriverPath(rec.Driver), "bind"), d.Address)
		}
		if err == nil {
			err = m.waitDriver(ctx, d.Address, rec.Driver)
		}
		if err != nil {
			m.restoreOverride(d)
			return fail(fmt.Sprintf("give back to %s", rec.Driver), err)
		}
	}
	if err := m.writeAttr(ctx, override, "\n"); err != nil {
		m.restoreOverride(d)
		return fail("clear driver_override", err)
	}
	if err := m.state.remove(d.Address); err != nil {
		o.Warning = err.Error()
	}
	o.Action = ActionUnbound
	return o
}

func orNone(driver string) string {
	if driver == "" {
		return "no driver"
	}
	return driver
}

// restoreOverride puts back the device's driver_override as it was before
// the call that failed ("" clears it), on a context of its own: the
// caller's may be what ran out.
func (m *Manager) restoreOverride(d *Device) {
	ctx, cancel := context.WithTimeout(context.Background(), m.timeout)
	defer cancel()
	_ = m.writeAttr(ctx, filepath.Join(m.sysfs.DevicePath(d.Address), "driver_override"), d.DriverOverride+"\n")
}

func (m *Manager) ensureDriver(ctx context.Context, driver, module string) error {
	if m.sysfs.DriverLoaded(driver) {
		return nil
	}
	if m.loader == nil {
		return fmt.Errorf("driver %s: %w (load module %s)", driver, ErrDriverNotLoaded, module)
	}
	if err := m.loader.LoadModule(ctx, module); err != nil {
		return fmt.Errorf("load module %s for driver %s: %w", module, driver, err)
	}
	if !m.sysfs.DriverLoaded(driver) {
		return fmt.Errorf("driver %s: %w after loading module %s", driver, ErrDriverNotLoaded, module)
	}
	return nil
}

// writeAttr writes one value to a sysfs attribute. The kernel runs the
// driver's probe or remove inside the write, which can hang on a sick
// device, so the write is abandoned (not cancelled: it cannot be) when ctx ends.
func (m *Manager) writeAttr(ctx context.Context, path, value string) error {
	if ctx.Err() != nil {
		// Nothing reaches the kernel once the caller has given up.
		return fmt.Errorf("write %q: %w", path, ErrTimeout)
	}
	done := make(chan error, 1)
	go func() { done <- m.attrs.WriteAttr(path, value) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("write %q: %w", path, ErrTimeout)
	}
}

// unbindFrom takes the device from driver and waits until it has none. A
// device that left the driver on its own since it was read (the kernel
// answers ENODEV: the driver does not hold it) is where the write would
// have put it.
func (m *Manager) unbindFrom(ctx context.Context, driver, address string) error {
	err := m.writeAttr(ctx, filepath.Join(m.sysfs.DriverPath(driver), "unbind"), address)
	if errors.Is(err, syscall.ENODEV) && m.currentDriver(address) == "" {
		err = nil
	}
	if err == nil {
		err = m.waitDriver(ctx, address, "")
	}
	return err
}

// waitDriver waits until the device's driver is want ("" for none).
func (m *Manager) waitDriver(ctx context.Context, address, want string) error {
	var last string
	err := m.waitFor(ctx, func() (bool, error) {
		var err error
		last, err = linkBase(m.sysfs.DevicePath(address), "driver")
		return err == nil && last == want, err
	})
	if errors.Is(err, ErrTimeout) {
		if want == "" {
			return fmt.Errorf("driver %s still bound: %w", last, err)
		}
		if last == "" {
			last = "none"
		}
		return fmt.Errorf("driver is %s, not %s: %w", last, want, err)
	}
	return err
}

// waitFor polls cond until it holds. sysfs sends no inotify events for
// changes the kernel makes, so polling is the only way; it starts at 1 ms and
// backs off to 20 ms.
func (m *Manager) waitFor(ctx context.Context, cond func() (bool, error)) error {
	delay := time.Millisecond
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return ErrTimeout
		case <-time.After(delay):
		}
		delay = min(2*delay, 20*time.Millisecond)
	}
}
