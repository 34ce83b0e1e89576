package vfio_test

import (
	"context"
	"errors"
	"io/fs"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
)

// The tests here write through the emulator's WriteAttr, so that each
// write returns the kernel's answer as it does on a node.

const a10, a10Audio = "0000:65:00.0", "0000:65:00.1"

// hgxWithA10 is an HGX H100 board with an A10 and its audio function in
// group 60: the group a test breaks, next to eight it must not.
func hgxWithA10(a10Probe syscall.Errno) vfiotest.Node {
	n := vfiotest.HGXH100()
	for _, d := range vfiotest.A10WithAudio().Devices {
		d.IOMMUGroup = 60
		if d.Address == a10 {
			d.ProbeError = a10Probe
		}
		n.Devices = append(n.Devices, d)
	}
	return n
}

func newErrnoFixture(t *testing.T, n vfiotest.Node, opts ...vfio.Option) *fixture {
	t.Helper()
	f := newFixture(t, n)
	f.m = f.manager(append([]vfio.Option{vfio.WithAttrWriter(f.emu)}, opts...)...)
	return f
}

func wantErr(t *testing.T, what string, err error, names []string, causes ...error) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: no error; want one naming %v with causes %v", what, names, causes)
		return
	}
	for _, c := range causes {
		if !errors.Is(err, c) {
			t.Errorf("%s: error %q is not %v", what, err, c)
		}
	}
	for _, name := range names {
		if !strings.Contains(err.Error(), name) {
			t.Errorf("%s: error %q does not name %s", what, err, name)
		}
	}
}

// A write the kernel refuses in the middle of a group fails the group: the
// refused function's outcome names it and the kernel's errno, the functions
// bound before it go back to their drivers (or, when their host driver
// will not take them back, say so with both causes and keep their record
// for Unbind to finish), and the other groups are bound.
//
// Bind's own writes (driver_override, unbind, drivers_probe) can only get
// ENODEV or ENOENT from a kernel, which does not report probe errors
// through drivers_probe; EBUSY and EINVAL come from the bind that gives a
// function back to its driver. An ENODEV from unbind for a function that
// has no driver any more is no failure: it left on its own
// (TestBindFunctionThatLeftItsDriver).
func TestBindWriteRefused(t *testing.T) {
	unplugged := func(t *testing.T, f *fixture) {
		if err := f.emu.RemoveDevice(a10Audio); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name      string
		a10Probe  syscall.Errno
		change    func(*testing.T, *fixture)
		cause     error // of the audio function's failure
		causeText string
		rollback  error // of the A10's rollback; nil when it succeeds
	}{
		{name: "function unplugged after the plan", change: unplugged,
			cause: fs.ErrNotExist, causeText: "set driver_override"},
		{name: "host driver busy on rollback", a10Probe: syscall.EBUSY, change: unplugged,
			cause: fs.ErrNotExist, causeText: "set driver_override", rollback: syscall.EBUSY},
		{name: "host driver refuses on rollback", a10Probe: syscall.EINVAL, change: unplugged,
			cause: fs.ErrNotExist, causeText: "set driver_override", rollback: syscall.EINVAL},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newErrnoFixture(t, hgxWithA10(tc.a10Probe))
			p := f.plan(t, "", false, nil)
			tc.change(t, f)
			r := f.bind(t, p)

			audio := outcome(t, r, a10Audio)
			if audio.Action != vfio.ActionFailed {
				t.Errorf("audio function: %s, want failed", audio.Action)
			}
			wantErr(t, "audio function", audio.Err, []string{a10Audio, tc.causeText}, tc.cause)
			wantErr(t, "Result.Err", r.Err(), []string{a10Audio}, tc.cause)

			gpu := outcome(t, r, a10)
			if gpu.Action != vfio.ActionFailed || gpu.To != f.tree.Driver(a10) {
				t.Errorf("A10: %s to %q; want failed, to where it is (%q)", gpu.Action, gpu.To, f.tree.Driver(a10))
			}
			if tc.rollback == nil {
				wantErr(t, "A10", gpu.Err, []string{a10, "rolled back", a10Audio}, tc.cause)
				f.wantDriver(t, a10, "nvidia", "")
				if exists(filepath.Join(f.stateDir, a10+".json")) {
					t.Error("A10: record kept after a rollback that succeeded")
				}
			} else {
				wantErr(t, "A10", gpu.Err, []string{a10, "rollback failed", "give back to nvidia"}, tc.cause, tc.rollback)
				if d := f.tree.Driver(a10); d != "" {
					t.Errorf("A10: driver %q after its host driver refused it", d)
				}
				if !exists(filepath.Join(f.stateDir, a10+".json")) {
					t.Error("A10: record dropped although it is not back on nvidia")
				}
			}
			if d := f.tree.Driver(a10Audio); d != "" && d != "snd_hda_intel" {
				t.Errorf("audio function: driver %q, want where it was", d)
			}
			if n := r.Count(vfio.ActionBound); n != 8 {
				t.Errorf("bound %d devices, want the 8 H100s", n)
			}
			for _, addr := range vfiotest.HGXH100GPUs {
				f.wantDriver(t, addr, "vfio-pci", "vfio-pci")
			}
		})
	}
}

// A function that left its driver between the plan and the bind (the
// kernel answers the unbind with ENODEV) is already free: the group is
// bound, and the function goes back to the driver it had when it is given
// back.
func TestBindFunctionThatLeftItsDriver(t *testing.T) {
	f := newErrnoFixture(t, hgxWithA10(0))
	p := f.plan(t, "", false, nil)
	unbind := filepath.Join(f.tree.SysfsRoot, "bus/pci/drivers/snd_hda_intel/unbind")
	if err := f.emu.WriteAttr(unbind, a10Audio); err != nil {
		t.Fatal(err)
	}
	if r := f.bind(t, p); r.Err() != nil || r.Count(vfio.ActionBound) != 10 {
		t.Fatalf("bind: %d bound, %v; want all 10", r.Count(vfio.ActionBound), r.Err())
	}
	f.wantDriver(t, a10Audio, "vfio-pci", "vfio-pci")
	if r := f.m.Unbind(context.Background(), p, vfio.UnbindOptions{}); r.Err() != nil {
		t.Fatalf("unbind: %v", r.Err())
	}
	f.wantDriver(t, a10Audio, "snd_hda_intel", "")
}

// A function its host driver will not take back stays recorded and bound
// to nothing; its outcome names it, the driver and the kernel's errno. The
// rest of its group and the other groups go back.
func TestUnbindWriteRefused(t *testing.T) {
	for _, errno := range []syscall.Errno{syscall.EBUSY, syscall.ENODEV, syscall.EINVAL} {
		t.Run(errno.Error(), func(t *testing.T) {
			f := newErrnoFixture(t, hgxWithA10(errno))
			if r := f.bind(t, f.plan(t, "", false, nil)); r.Err() != nil {
				t.Fatal(r.Err())
			}
			r := f.m.Unbind(context.Background(), f.plan(t, "", false, nil), vfio.UnbindOptions{})
			o := outcome(t, r, a10)
			if o.Action != vfio.ActionFailed || o.To != "" {
				t.Errorf("A10: %s to %q; want failed, to no driver", o.Action, o.To)
			}
			wantErr(t, "A10", o.Err, []string{a10, "give back to nvidia"}, errno)
			wantErr(t, "Result.Err", r.Err(), []string{a10}, errno)
			if !exists(filepath.Join(f.stateDir, a10+".json")) {
				t.Error("A10: record dropped although it is not back on nvidia")
			}
			if d := f.tree.Driver(a10); d != "" {
				t.Errorf("A10: driver %q", d)
			}
			f.wantDriver(t, a10Audio, "snd_hda_intel", "")
			if n := r.Count(vfio.ActionUnbound); n != 9 {
				t.Errorf("unbound %d devices, want the 8 H100s and the audio function", n)
			}
			for _, addr := range vfiotest.HGXH100GPUs {
				f.wantDriver(t, addr, "nvidia", "")
			}
		})
	}
}

// Written as on a node, an unbind returns once the driver has let go, and
// one whose driver never lets go does not return: Bind gives up on it
// within its timeout and binds the rest.
func TestBindWritesReturnAsTheKernels(t *testing.T) {
	n := vfiotest.HGXH100()
	for i := range n.Devices {
		switch n.Devices[i].Address {
		case "0000:3a:00.0":
			n.Devices[i].RefuseUnbind = true
		case "0000:5d:00.0":
			n.Devices[i].UnbindDelay = 50 * time.Millisecond
		}
	}
	f := newErrnoFixture(t, n, vfio.WithTimeout(300*time.Millisecond))
	r := f.bind(t, f.plan(t, "", false, nil))
	o := outcome(t, r, "0000:3a:00.0")
	if o.Action != vfio.ActionFailed {
		t.Errorf("stuck device: %s, want failed", o.Action)
	}
	wantErr(t, "stuck device", o.Err, []string{"0000:3a:00.0"}, vfio.ErrTimeout)
	if n := r.Count(vfio.ActionBound); n != 7 {
		t.Errorf("bound %d devices, want the 7 others", n)
	}
	f.wantDriver(t, "0000:3a:00.0", "nvidia", "")
	f.wantDriver(t, "0000:5d:00.0", "vfio-pci", "vfio-pci")

	r = f.m.Unbind(context.Background(), f.plan(t, "", false, nil), vfio.UnbindOptions{})
	if r.Err() != nil || r.Count(vfio.ActionUnbound) != 7 {
		t.Fatalf("unbind: %v, %+v", r.Err(), r.Outcomes)
	}
	f.wantDriver(t, "0000:5d:00.0", "nvidia", "")
}
