package vfio_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
)

type fixture struct {
	tree     *vfiotest.Tree
	emu      *vfiotest.Emulator
	stateDir string
	m        *vfio.Manager
}

func newFixture(t *testing.T, n vfiotest.Node, opts ...vfio.Option) *fixture {
	t.Helper()
	tree, emu := vfiotest.New(t, n)
	f := &fixture{tree: tree, emu: emu, stateDir: filepath.Join(t.TempDir(), "state")}
	f.m = f.manager(opts...)
	return f
}

// manager is a Manager on the fixture's tree with opts on top.
func (f *fixture) manager(opts ...vfio.Option) *vfio.Manager {
	return vfio.NewManager(f.stateDir, append([]vfio.Option{
		vfio.WithSysfsRoot(f.tree.SysfsRoot), vfio.WithDevRoot(f.tree.DevRoot),
		vfio.WithHostRoot(f.tree.HostRoot),
		vfio.WithTimeout(2 * time.Second),
	}, opts...)...)
}

func (f *fixture) plan(t *testing.T, list string, nvswitches bool, addresses []string) *vfio.Plan {
	t.Helper()
	devices, err := f.m.Sysfs().Devices()
	if err != nil {
		t.Fatal(err)
	}
	sel, err := vfio.ParseSelector(list, nvswitches)
	if err != nil {
		t.Fatal(err)
	}
	p, err := vfio.NewPlanAll(devices, sel)
	if addresses != nil {
		p, err = vfio.NewPlan(devices, sel, addresses)
	}
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func (f *fixture) bind(t *testing.T, p *vfio.Plan) *vfio.Result {
	t.Helper()
	r, err := f.m.Bind(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func outcome(t *testing.T, r *vfio.Result, addr string) vfio.Outcome {
	t.Helper()
	for _, o := range r.Outcomes {
		if o.Address == addr {
			return o
		}
	}
	t.Fatalf("no outcome for %s in %+v", addr, r.Outcomes)
	return vfio.Outcome{}
}

func (f *fixture) wantDriver(t *testing.T, addr, driver, override string) {
	t.Helper()
	if got := f.tree.Driver(addr); got != driver {
		t.Errorf("%s: driver %q, want %q", addr, got, driver)
	}
	if got := f.tree.DriverOverride(addr); got != override {
		t.Errorf("%s: driver_override %q, want %q", addr, got, override)
	}
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func TestBindAndUnbindHGX(t *testing.T) {
	f := newFixture(t, vfiotest.HGXH100())
	p := f.plan(t, "", true, nil)
	if len(p.Groups) != 12 {
		t.Fatalf("plan has %d groups, want 12 (8 GPUs, 4 NVSwitches)", len(p.Groups))
	}
	r := f.bind(t, p)
	if err := r.Err(); err != nil {
		t.Fatal(err)
	}
	if n := r.Count(vfio.ActionBound); n != 12 {
		t.Fatalf("bound %d devices, want 12: %+v", n, r.Outcomes)
	}
	for i, addr := range append(slices.Clone(vfiotest.HGXH100GPUs), vfiotest.HGXH100NVSwitches...) {
		f.wantDriver(t, addr, "vfio-pci", "vfio-pci")
		group := 20 + i
		if i >= 8 {
			group = 40 + i - 8
		}
		if !exists(f.tree.GroupNode(group)) {
			t.Errorf("%s: %s missing after bind", addr, f.tree.GroupNode(group))
		}
		if !exists(filepath.Join(f.stateDir, addr+".json")) {
			t.Errorf("%s: no state record", addr)
		}
	}
	// The switch ports are bridges in groups of their own: never touched.
	f.wantDriver(t, "0000:17:00.0", "pcieport", "")

	// A second bind changes nothing.
	r = f.bind(t, f.plan(t, "", true, nil))
	if n := r.Count(vfio.ActionUnchanged); n != 12 || r.Err() != nil {
		t.Fatalf("second bind: %d unchanged, err %v; want 12 unchanged", n, r.Err())
	}

	r = f.m.Unbind(context.Background(), f.plan(t, "", true, nil), vfio.UnbindOptions{})
	if err := r.Err(); err != nil {
		t.Fatal(err)
	}
	if n := r.Count(vfio.ActionUnbound); n != 12 {
		t.Fatalf("unbound %d devices, want 12", n)
	}
	for _, addr := range vfiotest.HGXH100GPUs {
		f.wantDriver(t, addr, "nvidia", "")
	}
	if entries, _ := os.ReadDir(f.stateDir); len(entries) != 0 {
		t.Errorf("state dir still holds %d records after unbind", len(entries))
	}
	if exists(f.tree.GroupNode(20)) {
		t.Errorf("%s still there after unbind", f.tree.GroupNode(20))
	}
}

func TestBindLeavesUnselectedDevicesAlone(t *testing.T) {
	f := newFixture(t, vfiotest.HGXH100())
	r := f.bind(t, f.plan(t, "", false, []string{"2a:00.0"}))
	if r.Err() != nil || r.Count(vfio.ActionBound) != 1 {
		t.Fatalf("bind one: %+v", r.Outcomes)
	}
	f.wantDriver(t, "0000:2a:00.0", "vfio-pci", "vfio-pci")
	for _, addr := range append(slices.Clone(vfiotest.HGXH100GPUs), vfiotest.HGXH100NVSwitches...) {
		if addr != "0000:2a:00.0" {
			f.wantDriver(t, addr, "nvidia", "")
		}
	}
}

func TestBindCompanionAudio(t *testing.T) {
	f := newFixture(t, vfiotest.A10WithAudio())
	p := f.plan(t, "", false, nil)
	if got := p.Members(); len(got) != 2 || got[1].Role != vfio.RoleCompanion {
		t.Fatalf("plan members %+v; want the GPU and its audio function as companion", got)
	}
	if r := f.bind(t, p); r.Err() != nil {
		t.Fatal(r.Err())
	}
	f.wantDriver(t, "0000:65:00.0", "vfio-pci", "vfio-pci")
	f.wantDriver(t, "0000:65:00.1", "vfio-pci", "vfio-pci")

	r := f.m.Unbind(context.Background(), f.plan(t, "", false, nil), vfio.UnbindOptions{})
	if r.Err() != nil {
		t.Fatal(r.Err())
	}
	f.wantDriver(t, "0000:65:00.0", "nvidia", "")
	f.wantDriver(t, "0000:65:00.1", "snd_hda_intel", "")
}

func TestBindRefusesGroupWithHostDevice(t *testing.T) {
	f := newFixture(t, vfiotest.GroupWithNIC())
	r := f.bind(t, f.plan(t, "", false, nil))
	err := r.Err()
	if !errors.Is(err, vfio.ErrGroupNotViable) {
		t.Fatalf("error = %v; want ErrGroupNotViable", err)
	}
	for _, name := range []string{"0000:17:00.0", "0000:18:00.0", "i40e"} {
		if !strings.Contains(err.Error(), name) {
			t.Errorf("error %q does not name %s", err, name)
		}
	}
	if o := outcome(t, r, "0000:17:00.0"); o.Action != vfio.ActionSkipped {
		t.Errorf("GPU in the shared group: %s, want skipped", o.Action)
	}
	f.wantDriver(t, "0000:17:00.0", "nvidia", "")
	f.wantDriver(t, "0000:18:00.0", "i40e", "")
	// The other group is still bound.
	f.wantDriver(t, "0000:65:00.0", "vfio-pci", "vfio-pci")
}

func TestBindNoIOMMU(t *testing.T) {
	f := newFixture(t, vfiotest.NoIOMMU())
	_, err := f.m.Bind(context.Background(), f.plan(t, "", false, nil))
	if !errors.Is(err, vfio.ErrNoIOMMU) || !strings.Contains(err.Error(), "intel_iommu=on") {
		t.Fatalf("error = %v; want ErrNoIOMMU with advice", err)
	}
	f.wantDriver(t, "0000:65:00.0", "nvidia", "")
	if exists(f.stateDir) {
		t.Error("state dir created although nothing was bound")
	}
}

func TestBindTimeoutKeepsOtherGroups(t *testing.T) {
	n := vfiotest.HGXH100()
	for i := range n.Devices {
		if n.Devices[i].Address == "0000:3a:00.0" {
			n.Devices[i].RefuseUnbind = true
		}
		if n.Devices[i].Address == "0000:5d:00.0" {
			n.Devices[i].UnbindDelay = 50 * time.Millisecond
		}
	}
	f := newFixture(t, n, vfio.WithTimeout(300*time.Millisecond))
	r := f.bind(t, f.plan(t, "", false, nil))
	o := outcome(t, r, "0000:3a:00.0")
	if o.Action != vfio.ActionFailed || !errors.Is(o.Err, vfio.ErrTimeout) || !strings.Contains(o.Err.Error(), "0000:3a:00.0") {
		t.Fatalf("stuck device: %+v; want failed with a timeout naming it", o)
	}
	if n := r.Count(vfio.ActionBound); n != 7 {
		t.Errorf("bound %d devices, want the 7 others", n)
	}
	// The stuck device keeps its driver and loses the override we set.
	f.wantDriver(t, "0000:3a:00.0", "nvidia", "")
	f.wantDriver(t, "0000:5d:00.0", "vfio-pci", "vfio-pci")
	if exists(filepath.Join(f.stateDir, "0000:3a:00.0.json")) {
		t.Error("state record kept for a device that was never bound")
	}
}

// A group is bound whole or not at all: when one function cannot leave its
// driver, the functions already bound are given back.
func TestBindRollsBackPartialGroup(t *testing.T) {
	n := vfiotest.A10WithAudio()
	n.Devices[1].RefuseUnbind = true
	f := newFixture(t, n, vfio.WithTimeout(200*time.Millisecond))
	r := f.bind(t, f.plan(t, "", false, nil))
	if r.Err() == nil {
		t.Fatal("bind succeeded with a function stuck on its driver")
	}
	if o := outcome(t, r, "0000:65:00.0"); o.Action != vfio.ActionFailed || !strings.Contains(o.Err.Error(), "rolled back") {
		t.Errorf("GPU: %+v; want failed and rolled back", o)
	}
	f.wantDriver(t, "0000:65:00.0", "nvidia", "")
	f.wantDriver(t, "0000:65:00.1", "snd_hda_intel", "")
	if entries, _ := os.ReadDir(f.stateDir); len(entries) != 0 {
		t.Errorf("state dir holds %d records after a rollback", len(entries))
	}
}

// A device on vfio without a usable record was not bound by this package
// (vfio-pci.ids=, an administrator, a record lost): unbind leaves it alone
// unless forced, and forced it has no driver to go back to.
func TestUnbindWithoutUsableState(t *testing.T) {
	for _, tc := range []struct {
		name   string
		damage func(path string) error
	}{
		{"missing", os.Remove},
		{"corrupt", func(p string) error { return os.WriteFile(p, []byte("{not json"), 0o600) }},
		{"other device", func(p string) error {
			return os.WriteFile(p, []byte(`{"address":"0000:00:00.0","driver":"e1000e"}`), 0o600)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, vfiotest.A10WithAudio())
			if r := f.bind(t, f.plan(t, "", false, nil)); r.Err() != nil {
				t.Fatal(r.Err())
			}
			if err := tc.damage(filepath.Join(f.stateDir, "0000:65:00.0.json")); err != nil {
				t.Fatal(err)
			}
			r := f.m.Unbind(context.Background(), f.plan(t, "", false, nil), vfio.UnbindOptions{})
			if r.Err() != nil {
				t.Fatal(r.Err())
			}
			o := outcome(t, r, "0000:65:00.0")
			if o.Action != vfio.ActionLeft || o.To != "vfio-pci" || !strings.Contains(o.Warning, "not bound by vfio-manager") {
				t.Errorf("outcome %+v; want left on vfio-pci with a warning", o)
			}
			f.wantDriver(t, "0000:65:00.0", "vfio-pci", "vfio-pci")
			f.wantDriver(t, "0000:65:00.1", "snd_hda_intel", "")

			r = f.m.Unbind(context.Background(), f.plan(t, "", false, nil), vfio.UnbindOptions{Force: true})
			if r.Err() != nil {
				t.Fatal(r.Err())
			}
			o = outcome(t, r, "0000:65:00.0")
			if o.Action != vfio.ActionUnbound || o.To != "" || !strings.Contains(o.Warning, "without a driver") {
				t.Errorf("forced: outcome %+v; want unbound, no driver, a warning", o)
			}
			f.wantDriver(t, "0000:65:00.0", "", "")
		})
	}
}

// A device that vfio-pci.ids= put on vfio at boot is no bind of ours: bind
// leaves it unchanged and unbind --all leaves it where it is.
func TestUnbindLeavesDevicesBoundByOthers(t *testing.T) {
	n := vfiotest.A10WithAudio()
	for i := range n.Devices {
		n.Devices[i].Driver = "vfio-pci"
	}
	f := newFixture(t, n)
	r := f.bind(t, f.plan(t, "", false, nil))
	if r.Count(vfio.ActionUnchanged) != 2 || r.Err() != nil {
		t.Fatalf("bind of devices already on vfio: %+v", r.Outcomes)
	}
	r = f.m.Unbind(context.Background(), f.plan(t, "", false, nil), vfio.UnbindOptions{})
	if r.Count(vfio.ActionLeft) != 2 || r.Err() != nil {
		t.Fatalf("unbind: %+v; want both left", r.Outcomes)
	}
	f.wantDriver(t, "0000:65:00.0", "vfio-pci", "")
	f.wantDriver(t, "0000:65:00.1", "vfio-pci", "")
}

// holdOpen opens a device node as a VMM would and keeps it open until the
// test ends.
func holdOpen(t *testing.T, path string) {
	t.Helper()
	fh, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fh.Close() })
}

// A group whose node a process holds open (a running VM) is refused whole:
// nothing in it is written, the error names the process; the other groups
// go back. Force takes it anyway.
func TestUnbindRefusesGroupInUse(t *testing.T) {
	n := vfiotest.HGXH100()
	for _, d := range vfiotest.A10WithAudio().Devices {
		d.IOMMUGroup = 60 // the preset's own number is an H100's here
		n.Devices = append(n.Devices, d)
	}
	f := newFixture(t, n)
	if r := f.bind(t, f.plan(t, "", false, nil)); r.Err() != nil {
		t.Fatal(r.Err())
	}
	a10Group := outcomeGroup(t, f, "0000:65:00.0")
	holdOpen(t, f.tree.GroupNode(a10Group))
	holdOpen(t, f.tree.GroupNode(20)) // the first H100

	r := f.m.Unbind(context.Background(), f.plan(t, "", false, nil), vfio.UnbindOptions{})
	err := r.Err()
	if !errors.Is(err, vfio.ErrInUse) {
		t.Fatalf("error = %v; want ErrInUse", err)
	}
	for _, want := range []string{fmt.Sprintf("pid %d", os.Getpid()), fmt.Sprintf("/dev/vfio/%d", a10Group), "/dev/vfio/20"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}
	for _, addr := range []string{"0000:65:00.0", "0000:65:00.1", "0000:18:00.0"} {
		if o := outcome(t, r, addr); o.Action != vfio.ActionRefused {
			t.Errorf("%s: %s, want refused", addr, o.Action)
		}
		f.wantDriver(t, addr, "vfio-pci", "vfio-pci")
		if !exists(filepath.Join(f.stateDir, addr+".json")) {
			t.Errorf("%s: record removed although the device stayed", addr)
		}
	}
	if n := r.Count(vfio.ActionUnbound); n != 7 {
		t.Errorf("unbound %d devices, want the 7 free H100s", n)
	}

	r = f.m.Unbind(context.Background(), f.plan(t, "", false, nil), vfio.UnbindOptions{Force: true})
	if r.Err() != nil || r.Count(vfio.ActionUnbound) != 3 {
		t.Fatalf("forced unbind: %+v", r.Outcomes)
	}
	f.wantDriver(t, "0000:65:00.1", "snd_hda_intel", "")
}

// A GPU that a process still uses through the nvidia driver (persistenced,
// DCGM, NVML in a device plugin, a container) cannot be taken from it: the
// driver's remove would wait for the process. Its group is refused, named
// with the process, and not touched; the others are bound.
func TestBindRefusesGPUHeldThroughHostDriver(t *testing.T) {
	f := newFixture(t, vfiotest.HGXH100())
	// The tree's proc root, with this process in it, is what the agent sees.
	f.m = f.manager(vfio.WithProcRoot(f.tree.ProcRoot))
	if err := f.tree.AddProcess(os.Getpid()); err != nil {
		t.Fatal(err)
	}
	held := vfiotest.HGXH100GPUs[2]
	holdOpen(t, f.tree.NVIDIANode(held))

	r := f.bind(t, f.plan(t, "", false, nil))
	o := outcome(t, r, held)
	if o.Action != vfio.ActionRefused || !errors.Is(o.Err, vfio.ErrInUse) {
		t.Fatalf("%s: %s, %v; want refused, in use", held, o.Action, o.Err)
	}
	for _, want := range []string{fmt.Sprintf("pid %d", os.Getpid()), "/dev/nvidia2", "iommu group 22"} {
		if !strings.Contains(o.Err.Error(), want) {
			t.Errorf("error %q does not name %s", o.Err, want)
		}
	}
	f.wantDriver(t, held, "nvidia", "")
	if exists(filepath.Join(f.stateDir, held+".json")) {
		t.Errorf("%s: a record written for a device that was not touched", held)
	}
	if n := r.Count(vfio.ActionBound); n != 7 {
		t.Errorf("bound %d devices, want the 7 free H100s", n)
	}
}

// A process that cannot be checked is a process that may hold the device.
func TestUnbindRefusesWhenProcessesCannotBeRead(t *testing.T) {
	f := newFixture(t, vfiotest.A10WithAudio(), vfio.WithProcRoot(filepath.Join(t.TempDir(), "no-proc")))
	if r := f.bind(t, f.plan(t, "", false, nil)); r.Err() != nil {
		t.Fatal(r.Err())
	}
	r := f.m.Unbind(context.Background(), f.plan(t, "", false, nil), vfio.UnbindOptions{})
	if err := r.Err(); err == nil || !strings.Contains(err.Error(), "no-proc") || r.Count(vfio.ActionRefused) != 2 {
		t.Fatalf("unbind without a readable proc root: %+v, %v", r.Outcomes, err)
	}
	f.wantDriver(t, "0000:65:00.0", "vfio-pci", "vfio-pci")
}

// The kernel finishes an unbind that an earlier call gave up waiting for
// (the VMM let go later): the device is left driverless with its record.
// The next unbind gives it back to the recorded driver and drops the record,
// rather than calling it unchanged.
func TestUnbindFinishesLateUnbind(t *testing.T) {
	f := newFixture(t, vfiotest.A10WithAudio())
	if r := f.bind(t, f.plan(t, "", false, nil)); r.Err() != nil {
		t.Fatal(r.Err())
	}
	unbind := filepath.Join(f.tree.SysfsRoot, "bus/pci/drivers/vfio-pci/unbind")
	if err := os.WriteFile(unbind, []byte("0000:65:00.1"), 0); err != nil {
		t.Fatal(err)
	}
	for f.tree.Driver("0000:65:00.1") != "" {
		time.Sleep(time.Millisecond)
	}
	r := f.m.Unbind(context.Background(), f.plan(t, "", false, nil), vfio.UnbindOptions{})
	if r.Err() != nil || r.Count(vfio.ActionUnbound) != 2 {
		t.Fatalf("unbind: %+v", r.Outcomes)
	}
	f.wantDriver(t, "0000:65:00.1", "snd_hda_intel", "")
	if entries, _ := os.ReadDir(f.stateDir); len(entries) != 0 {
		t.Errorf("state dir still holds %d records", len(entries))
	}
}

// A caller that gives up (a deadline, SIGTERM) in the middle of a group
// whose audio function will not leave its driver still gets the group back
// whole: the GPU returns to nvidia, no override is left behind, and the
// outcomes say where each device really is.
func TestCancelledBindRollsBackWholeGroup(t *testing.T) {
	n := vfiotest.A10WithAudio()
	n.Devices[1].RefuseUnbind = true
	f := newFixture(t, n, vfio.WithTimeout(5*time.Second))
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	defer cancel()
	r, err := f.m.Bind(ctx, f.plan(t, "", false, nil))
	if err != nil {
		t.Fatal(err)
	}
	if r.Err() == nil {
		t.Fatal("bind succeeded")
	}
	f.wantDriver(t, "0000:65:00.0", "nvidia", "")
	f.wantDriver(t, "0000:65:00.1", "snd_hda_intel", "")
	for _, o := range r.Outcomes {
		if o.Action != vfio.ActionFailed || o.To != f.tree.Driver(o.Address) {
			t.Errorf("%s: %s to %q; want failed, to where it is (%q)", o.Address, o.Action, o.To, f.tree.Driver(o.Address))
		}
	}
	if entries, _ := os.ReadDir(f.stateDir); len(entries) != 0 {
		t.Errorf("state dir holds %d records after the rollback", len(entries))
	}
}

func outcomeGroup(t *testing.T, f *fixture, addr string) int {
	t.Helper()
	d, err := f.m.Sysfs().Device(addr)
	if err != nil {
		t.Fatal(err)
	}
	return d.IOMMUGroup
}

// A bind that died between unbind and probe left the device driverless; the
// next bind must keep the driver recorded then, not record "none".
func TestBindResumesAfterCrash(t *testing.T) {
	f := newFixture(t, vfiotest.A10WithAudio())
	if r := f.bind(t, f.plan(t, "", false, []string{"0000:65:00.0"})); r.Err() != nil {
		t.Fatal(r.Err())
	}
	// Simulate the crash: the device leaves vfio-pci but the record stays.
	unbind := filepath.Join(f.tree.SysfsRoot, "bus/pci/drivers/vfio-pci/unbind")
	if err := os.WriteFile(unbind, []byte("0000:65:00.0"), 0); err != nil {
		t.Fatal(err)
	}
	for f.tree.Driver("0000:65:00.0") != "" {
		time.Sleep(time.Millisecond)
	}
	if r := f.bind(t, f.plan(t, "", false, nil)); r.Err() != nil {
		t.Fatal(r.Err())
	}
	if r := f.m.Unbind(context.Background(), f.plan(t, "", false, nil), vfio.UnbindOptions{}); r.Err() != nil {
		t.Fatal(r.Err())
	}
	f.wantDriver(t, "0000:65:00.0", "nvidia", "")
}

func TestBindPicksVariantDriverAndLoadsIt(t *testing.T) {
	n := vfiotest.Node{Devices: []vfiotest.Device{{
		Address: "0009:01:00.0", Vendor: 0x10de, DeviceID: 0x2342, Class: 0x030200, // GH100 on Grace
		Driver: "nvidia", IOMMUGroup: 7, NUMANode: 0,
	}}}
	loader := &recordingLoader{}
	f := newFixture(t, n, vfio.WithModuleLoader(loader))
	loader.emu = f.emu
	r := f.bind(t, f.plan(t, "", false, nil))
	if r.Err() != nil {
		t.Fatal(r.Err())
	}
	if !slices.Equal(loader.loaded, []string{"nvgrace_gpu_vfio_pci"}) {
		t.Errorf("modules loaded: %v; want nvgrace_gpu_vfio_pci", loader.loaded)
	}
	f.wantDriver(t, "0009:01:00.0", "nvgrace_gpu_vfio_pci", "nvgrace_gpu_vfio_pci")
}

func TestBindWithoutDriverOrLoader(t *testing.T) {
	n := vfiotest.A10WithAudio()
	n.Drivers = nil // vfio-pci not loaded
	f := newFixture(t, n)
	_, err := f.m.Bind(context.Background(), f.plan(t, "", false, nil))
	if !errors.Is(err, vfio.ErrDriverNotLoaded) || !strings.Contains(err.Error(), "vfio_pci") {
		t.Fatalf("error = %v; want ErrDriverNotLoaded naming the module", err)
	}
	f.wantDriver(t, "0000:65:00.0", "nvidia", "")
}

func TestDryRun(t *testing.T) {
	f := newFixture(t, vfiotest.A10WithAudio(), vfio.WithDryRun(true))
	r := f.bind(t, f.plan(t, "", false, nil))
	if r.Count(vfio.ActionPlanned) != 2 || r.Err() != nil {
		t.Fatalf("dry run: %+v", r.Outcomes)
	}
	f.wantDriver(t, "0000:65:00.0", "nvidia", "")
	if exists(f.stateDir) {
		t.Error("dry run wrote state")
	}
}

func TestPlanRejectsBadAddresses(t *testing.T) {
	f := newFixture(t, vfiotest.GroupWithNIC())
	devices, _ := f.m.Sysfs().Devices()
	sel, _ := vfio.ParseSelector("", false)
	for _, tc := range []struct {
		addr string
		want error
	}{
		{"0000:99:00.0", vfio.ErrDeviceNotFound},
		{"0000:18:00.0", vfio.ErrNotSelected}, // the NIC: not NVIDIA
		{"18:00", vfio.ErrInvalidAddress},
	} {
		if _, err := vfio.NewPlan(devices, sel, []string{tc.addr}); !errors.Is(err, tc.want) {
			t.Errorf("NewPlan(%s) error = %v; want %v", tc.addr, err, tc.want)
		}
	}
}

type recordingLoader struct {
	emu    *vfiotest.Emulator
	loaded []string
}

func (l *recordingLoader) LoadModule(_ context.Context, name string) error {
	l.loaded = append(l.loaded, name)
	return l.emu.LoadDriver(name)
}

// pci-stub matches no device by id: a device is given back to it through
// driver_override, as on a real kernel.
func TestUnbindGivesBackToOverrideOnlyDriver(t *testing.T) {
	n := vfiotest.Node{Drivers: []string{"vfio-pci"}, Devices: []vfiotest.Device{{
		Address: "0000:00:04.0", Vendor: 0x1234, DeviceID: 0x1111, Class: 0x030000,
		Driver: "pci-stub", NativeDriver: "bochs-drm", IOMMUGroup: 3, NUMANode: -1,
	}}}
	f := newFixture(t, n)
	if r := f.bind(t, f.plan(t, "1234:1111", false, nil)); r.Err() != nil {
		t.Fatal(r.Err())
	}
	f.wantDriver(t, "0000:00:04.0", "vfio-pci", "vfio-pci")
	if r := f.m.Unbind(context.Background(), f.plan(t, "1234:1111", false, nil), vfio.UnbindOptions{}); r.Err() != nil {
		t.Fatal(r.Err())
	}
	f.wantDriver(t, "0000:00:04.0", "pci-stub", "")
}

// A vGPU host: the L40S's SR-IOV virtual functions are not GPUs to take
// unless named by their device id, and the physical function, with VFs
// enabled, is refused up front with the VF count and the way out.
func TestSRIOV(t *testing.T) {
	n := vfiotest.Node{Drivers: []string{"vfio-pci"}, Devices: []vfiotest.Device{
		{Address: "0000:3b:00.0", Vendor: 0x10de, DeviceID: 0x26b9, Class: 0x030200, Driver: "nvidia",
			IOMMUGroup: 50, NUMANode: 0, TotalVFs: 32, NumVFs: 2},
		{Address: "0000:3b:00.4", Vendor: 0x10de, DeviceID: 0x26ba, Class: 0x030200, Driver: "nvidia",
			IOMMUGroup: 51, NUMANode: 0, PhysFn: "0000:3b:00.0"},
		{Address: "0000:3b:00.5", Vendor: 0x10de, DeviceID: 0x26ba, Class: 0x030200, Driver: "nvidia",
			IOMMUGroup: 52, NUMANode: 0, PhysFn: "0000:3b:00.0"},
	}}
	f := newFixture(t, n)
	p := f.plan(t, "", false, nil)
	if len(p.Groups) != 1 || p.Groups[0].Members[0].Address != "0000:3b:00.0" {
		t.Fatalf("plan %+v; want the physical function only", p.Members())
	}
	err := p.Groups[0].Err
	if !errors.Is(err, vfio.ErrVFsEnabled) || !strings.Contains(err.Error(), "2 virtual functions") || !strings.Contains(err.Error(), "sriov_numvfs") {
		t.Errorf("group error %v; want ErrVFsEnabled with the count and the way out", err)
	}
	r := f.bind(t, p)
	if o := outcome(t, r, "0000:3b:00.0"); o.Action != vfio.ActionSkipped {
		t.Errorf("physical function: %+v", o)
	}
	f.wantDriver(t, "0000:3b:00.0", "nvidia", "")

	// Named by their id, the VFs are taken, each in its group.
	r = f.bind(t, f.plan(t, "10de:26ba", false, nil))
	if r.Err() != nil || r.Count(vfio.ActionBound) != 2 {
		t.Fatalf("VFs by id: %+v", r.Outcomes)
	}
	f.wantDriver(t, "0000:3b:00.4", "vfio-pci", "vfio-pci")
}

// A kernel with iommufd only (no group interface): a bind is complete when
// every function has its cdev, and a bind that never completes gives up
// within --timeout, its rollback included, instead of waiting for a group
// node that will never come.
func TestIOMMUFDOnlyKernel(t *testing.T) {
	n := vfiotest.A10WithAudio()
	n.IOMMUFDOnly = true
	f := newFixture(t, n)
	if r := f.bind(t, f.plan(t, "", false, nil)); r.Err() != nil {
		t.Fatal(r.Err())
	}
	if exists(f.tree.GroupNode(21)) {
		t.Error("a group node on a kernel without the group interface")
	}
	d, err := f.m.Sysfs().Device("0000:65:00.0")
	if err != nil || d.VFIODevice == "" || !exists(filepath.Join(f.tree.DevRoot, "vfio/devices", d.VFIODevice)) {
		t.Fatalf("no cdev after bind: %+v, %v", d, err)
	}
	if r := f.m.Unbind(context.Background(), f.plan(t, "", false, nil), vfio.UnbindOptions{}); r.Err() != nil {
		t.Fatal(r.Err())
	}
	f.wantDriver(t, "0000:65:00.1", "snd_hda_intel", "")

	// The cdev directory without its node (Debian's 6.1) is no cdev: with
	// no group interface either, the group never becomes openable.
	n.CDevWithoutNode = true
	f = newFixture(t, n, vfio.WithTimeout(200*time.Millisecond))
	start := time.Now()
	r := f.bind(t, f.plan(t, "", false, nil))
	if r.Err() == nil || !strings.Contains(r.Err().Error(), "cdev") {
		t.Fatalf("bind: %v; want a failure naming the missing nodes", r.Err())
	}
	if elapsed := time.Since(start); elapsed > 10*time.Second {
		t.Errorf("bind took %s with a 200ms timeout", elapsed)
	}
	f.wantDriver(t, "0000:65:00.0", "nvidia", "")
	f.wantDriver(t, "0000:65:00.1", "snd_hda_intel", "")
}

// The module behind a driver is recorded at bind time: a driver unloaded
// meanwhile is loaded again by its module's name, which its own name does
// not tell (xhci_hcd is xhci_pci's).
func TestUnbindLoadsTheRecordedModule(t *testing.T) {
	n := vfiotest.A10WithAudio()
	n.Devices = append(n.Devices, vfiotest.Device{Address: "0000:65:00.2", Vendor: 0x10de, DeviceID: 0x1ad9,
		Class: 0x0c0330, Driver: "xhci_hcd", IOMMUGroup: 21, NUMANode: 0})
	n.Modules = map[string]string{"xhci_hcd": "xhci_pci"}
	loader := &moduleLoader{drivers: map[string]string{"xhci_pci": "xhci_hcd"}}
	f := newFixture(t, n, vfio.WithModuleLoader(loader))
	loader.emu = f.emu
	if r := f.bind(t, f.plan(t, "", false, nil)); r.Err() != nil {
		t.Fatal(r.Err())
	}
	if err := f.emu.UnloadDriver("xhci_hcd"); err != nil {
		t.Fatal(err)
	}
	if r := f.m.Unbind(context.Background(), f.plan(t, "", false, nil), vfio.UnbindOptions{}); r.Err() != nil {
		t.Fatal(r.Err())
	}
	if !slices.Equal(loader.loaded, []string{"xhci_pci"}) {
		t.Errorf("modules loaded: %v; want xhci_pci", loader.loaded)
	}
	f.wantDriver(t, "0000:65:00.2", "xhci_hcd", "")
}

// moduleLoader loads modules that provide drivers of other names.
type moduleLoader struct {
	emu     *vfiotest.Emulator
	drivers map[string]string // module → driver
	loaded  []string
}

func (l *moduleLoader) LoadModule(_ context.Context, name string) error {
	l.loaded = append(l.loaded, name)
	return l.emu.LoadDriver(l.drivers[name])
}
