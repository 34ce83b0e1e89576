package vfiotest_test

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
)

// write is what "echo value > attr" does.
func write(t *testing.T, tree *vfiotest.Tree, attr, value string) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(tree.SysfsRoot, attr), os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(value); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// settle waits for the emulator to answer: it answers writes as the kernel
// would, but after the write returns.
func settle(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("emulator did not answer within 2s")
		}
		time.Sleep(time.Millisecond)
	}
}

func exists(p string) bool { _, err := os.Stat(p); return err == nil }

func TestKernelBehaviour(t *testing.T) {
	n := vfiotest.HGXH100()
	n.CDev = true
	tree, emu := vfiotest.New(t, n)
	gpu, gpu2 := vfiotest.HGXH100GPUs[0], vfiotest.HGXH100GPUs[1]
	dev := "bus/pci/devices/" + gpu + "/"

	if got := tree.DriverOverride(gpu); got != "" {
		t.Fatalf("fresh driver_override = %q", got)
	}
	raw, _ := os.ReadFile(filepath.Join(tree.SysfsRoot, dev, "driver_override"))
	if string(raw) != "(null)\n" {
		t.Errorf("fresh driver_override reads %q, want \"(null)\\n\" as the kernel prints it", raw)
	}

	// An override naming a driver that is not loaded: the probe finds nothing.
	write(t, tree, dev+"driver_override", "nvgrace_gpu_vfio_pci")
	write(t, tree, "bus/pci/drivers/nvidia/unbind", gpu)
	write(t, tree, "bus/pci/drivers/nvidia/unbind", gpu2)
	settle(t, func() bool { return tree.Driver(gpu) == "" && tree.Driver(gpu2) == "" })
	// Each pipe is answered in order, so once gpu2 (no override) is back on
	// nvidia, the write for gpu before it has been answered too.
	write(t, tree, "bus/pci/drivers_probe", gpu)
	write(t, tree, "bus/pci/drivers_probe", gpu2)
	settle(t, func() bool { return tree.Driver(gpu2) == "nvidia" })
	if d := tree.Driver(gpu); d != "" {
		t.Fatalf("probe bound %q although driver_override names a driver that is not loaded", d)
	}
	write(t, tree, "bus/pci/drivers/nvidia/unbind", gpu2)
	settle(t, func() bool { return tree.Driver(gpu2) == "" })
	// The override wins over the native driver even through bind.
	write(t, tree, "bus/pci/drivers/nvidia/bind", gpu)
	write(t, tree, "bus/pci/drivers/nvidia/bind", gpu2)
	settle(t, func() bool { return tree.Driver(gpu2) == "nvidia" })
	if d := tree.Driver(gpu); d != "" {
		t.Fatalf("bind to nvidia despite driver_override: driver %q", d)
	}
	write(t, tree, dev+"driver_override", "vfio-pci")
	write(t, tree, "bus/pci/drivers_probe", gpu)
	settle(t, func() bool { return tree.Driver(gpu) != "" })
	if d := tree.Driver(gpu); d != "vfio-pci" {
		t.Fatalf("driver after probe with override = %q, want vfio-pci", d)
	}
	if !exists(tree.GroupNode(20)) || !exists(filepath.Join(tree.DevRoot, "vfio/devices/vfio0")) ||
		!exists(filepath.Join(tree.SysfsRoot, dev, "vfio-dev/vfio0")) {
		t.Fatal("vfio nodes missing after bind")
	}

	// new_id makes vfio-pci claim every unbound device with those ids.
	write(t, tree, "bus/pci/drivers/nvidia/unbind", gpu2)
	settle(t, func() bool { return tree.Driver(gpu2) == "" })
	write(t, tree, "bus/pci/drivers/vfio-pci/new_id", "10de 2330")
	settle(t, func() bool { return tree.Driver(gpu2) == "vfio-pci" })
	if !exists(filepath.Join(tree.DevRoot, "vfio/devices/vfio1")) {
		t.Error("second device did not get vfio1")
	}

	// Unbinding removes the nodes; clearing the override reads (null) again.
	write(t, tree, dev+"driver_override", "\n")
	write(t, tree, "bus/pci/drivers/vfio-pci/unbind", gpu)
	settle(t, func() bool { return !exists(tree.GroupNode(20)) })
	if tree.Driver(gpu) != "" || exists(filepath.Join(tree.DevRoot, "vfio/devices/vfio0")) {
		t.Error("driver link or vfio cdev left after unbind")
	}
	raw, _ = os.ReadFile(filepath.Join(tree.SysfsRoot, dev, "driver_override"))
	if string(raw) != "(null)\n" {
		t.Errorf("cleared driver_override reads %q", raw)
	}
	write(t, tree, "bus/pci/drivers/vfio-pci/remove_id", "10de 2330")
	write(t, tree, "bus/pci/drivers/nvidia/bind", gpu)
	settle(t, func() bool { return tree.Driver(gpu) == "nvidia" })

	// Hot removal takes the device and its nodes away.
	if err := emu.RemoveDevice(gpu2); err != nil {
		t.Fatal(err)
	}
	if exists(filepath.Join(tree.SysfsRoot, "bus/pci/devices", gpu2)) || exists(tree.GroupNode(21)) {
		t.Error("removed device still visible")
	}
}

func TestSharedGroupNodeStaysUntilLastDeviceLeaves(t *testing.T) {
	tree, _ := vfiotest.New(t, vfiotest.A10WithAudio())
	for _, d := range []struct{ addr, drv string }{{"0000:65:00.0", "nvidia"}, {"0000:65:00.1", "snd_hda_intel"}} {
		write(t, tree, "bus/pci/devices/"+d.addr+"/driver_override", "vfio-pci")
		write(t, tree, "bus/pci/drivers/"+d.drv+"/unbind", d.addr)
		write(t, tree, "bus/pci/drivers_probe", d.addr)
		settle(t, func() bool { return tree.Driver(d.addr) == "vfio-pci" })
	}
	write(t, tree, "bus/pci/drivers/vfio-pci/unbind", "0000:65:00.0")
	settle(t, func() bool { return tree.Driver("0000:65:00.0") == "" })
	if !exists(tree.GroupNode(21)) {
		t.Fatal("group node removed while the audio function is still on vfio-pci")
	}
	write(t, tree, "bus/pci/drivers/vfio-pci/unbind", "0000:65:00.1")
	settle(t, func() bool { return !exists(tree.GroupNode(21)) })
}

func TestTreeLayout(t *testing.T) {
	tree, err := vfiotest.Build(t.TempDir(), vfiotest.HGXH100())
	if err != nil {
		t.Fatal(err)
	}
	for link, want := range map[string]string{
		"bus/pci/devices/0000:18:00.0":                             "../../../devices/pci0000:17/0000:17:00.0/0000:18:00.0",
		"devices/pci0000:17/0000:17:00.0/0000:18:00.0/driver":      "../../../../bus/pci/drivers/nvidia",
		"devices/pci0000:17/0000:17:00.0/0000:18:00.0/iommu_group": "../../../../kernel/iommu_groups/20",
		"kernel/iommu_groups/20/devices/0000:18:00.0":              "../../../../devices/pci0000:17/0000:17:00.0/0000:18:00.0",
		"bus/pci/drivers/nvidia/0000:18:00.0":                      "../../../../devices/pci0000:17/0000:17:00.0/0000:18:00.0",
	} {
		got, err := os.Readlink(filepath.Join(tree.SysfsRoot, link))
		if err != nil || got != want {
			t.Errorf("%s -> %q (%v), want %q", link, got, err, want)
		}
	}
	if _, err := vfiotest.Build(t.TempDir(), vfiotest.Node{Devices: []vfiotest.Device{
		{Address: "0000:01:00.0", Parent: "0000:00:01.0"}}}); err == nil {
		t.Error("a device whose parent is missing was accepted")
	}
}

// errnoNode has a device for each of the kernel's refusals: the A10 and its
// audio function, a bridge, an L40S physical function with VFs enabled,
// and an A10 whose host driver's probe fails.
func errnoNode() vfiotest.Node {
	n := vfiotest.A10WithAudio()
	n.Devices = append(n.Devices,
		vfiotest.Device{Address: "0000:00:01.0", Vendor: 0x8086, DeviceID: 0x1901, Class: vfiotest.ClassBridge,
			Driver: "pcieport", IOMMUGroup: 1},
		vfiotest.Device{Address: "0000:3b:00.0", Vendor: vfiotest.VendorNVIDIA, DeviceID: vfiotest.DeviceL40S,
			Class: vfiotest.Class3D, Driver: "nvidia", IOMMUGroup: 50, TotalVFs: 32, NumVFs: 2},
		vfiotest.Device{Address: "0000:17:00.0", Vendor: vfiotest.VendorNVIDIA, DeviceID: vfiotest.DeviceA10,
			Class: vfiotest.Class3D, Driver: "nvidia", IOMMUGroup: 30, ProbeError: syscall.EIO},
	)
	return n
}

// Each write gets the errno the kernel's store function returns, as the
// write's return, and changes nothing it should not.
func TestWriteAttrErrno(t *testing.T) {
	const gpu, bridge, pf, sick = "0000:65:00.0", "0000:00:01.0", "0000:3b:00.0", "0000:17:00.0"
	type step struct{ attr, value string }
	free := func(addr, from, override string) []step { // the device off its driver, override set
		return []step{{"bus/pci/devices/" + addr + "/driver_override", override}, {"bus/pci/drivers/" + from + "/unbind", addr}}
	}
	for _, tc := range []struct {
		name       string
		before     []step
		attr       string
		value      string
		want       error
		addr, then string // the device's driver after the write
	}{
		{name: "bind of an address the bus lacks", attr: "bus/pci/drivers/nvidia/bind", value: "0000:99:00.0", want: syscall.ENODEV},
		{name: "bind of a device with a driver", attr: "bus/pci/drivers/nvidia/bind", value: gpu + "\n",
			want: syscall.EBUSY, addr: gpu, then: "nvidia"},
		{name: "bind of a device the driver does not match", before: free(gpu, "nvidia", "\n"),
			attr: "bus/pci/drivers/vfio-pci/bind", value: gpu, want: syscall.ENODEV, addr: gpu, then: ""},
		{name: "bind against driver_override", before: free(gpu, "nvidia", "vfio-pci"),
			attr: "bus/pci/drivers/nvidia/bind", value: gpu, want: syscall.ENODEV, addr: gpu, then: ""},
		{name: "bind through driver_override", before: free(gpu, "nvidia", "vfio-pci"),
			attr: "bus/pci/drivers/vfio-pci/bind", value: gpu, addr: gpu, then: "vfio-pci"},
		{name: "vfio-pci refuses a PF with VFs enabled", before: free(pf, "nvidia", "vfio-pci"),
			attr: "bus/pci/drivers/vfio-pci/bind", value: pf, want: syscall.EBUSY, addr: pf, then: ""},
		{name: "vfio-pci refuses a bridge", before: free(bridge, "pcieport", "vfio-pci"),
			attr: "bus/pci/drivers/vfio-pci/bind", value: bridge, want: syscall.EINVAL, addr: bridge, then: ""},
		{name: "host driver's probe fails", before: free(sick, "nvidia", "\n"),
			attr: "bus/pci/drivers/nvidia/bind", value: sick, want: syscall.EIO, addr: sick, then: ""},
		{name: "unbind of a device the driver does not hold", attr: "bus/pci/drivers/vfio-pci/unbind", value: gpu,
			want: syscall.ENODEV, addr: gpu, then: "nvidia"},
		{name: "unbind of an address the bus lacks", attr: "bus/pci/drivers/nvidia/unbind", value: "0000:99:00.0", want: syscall.ENODEV},
		{name: "unbind", attr: "bus/pci/drivers/nvidia/unbind", value: gpu, addr: gpu, then: ""},
		{name: "drivers_probe of an address the bus lacks", attr: "bus/pci/drivers_probe", value: "0000:99:00.0", want: syscall.ENODEV},
		{name: "drivers_probe of a device with a driver", attr: "bus/pci/drivers_probe", value: gpu, addr: gpu, then: "nvidia"},
		{name: "drivers_probe does not report a failing probe", before: free(pf, "nvidia", "vfio-pci"),
			attr: "bus/pci/drivers_probe", value: pf, addr: pf, then: ""},
		{name: "new_id malformed", attr: "bus/pci/drivers/vfio-pci/new_id", value: "10de:2236", want: syscall.EINVAL},
		{name: "new_id twice", before: []step{{"bus/pci/drivers/vfio-pci/new_id", "1234 5678"}},
			attr: "bus/pci/drivers/vfio-pci/new_id", value: "0x1234 0x5678\n", want: syscall.EEXIST},
		{name: "new_id takes unbound devices", before: free(gpu, "nvidia", "\n"),
			attr: "bus/pci/drivers/vfio-pci/new_id", value: "10de 2236", addr: gpu, then: "vfio-pci"},
		{name: "remove_id of an id not added", attr: "bus/pci/drivers/vfio-pci/remove_id", value: "10de 2236", want: syscall.ENODEV},
		{name: "remove_id malformed", attr: "bus/pci/drivers/vfio-pci/remove_id", value: "10de", want: syscall.EINVAL},
		{name: "driver_override of a page", attr: "bus/pci/devices/" + gpu + "/driver_override",
			value: strings.Repeat("a", 4095), want: syscall.EINVAL},
		{name: "attribute of a driver not loaded", attr: "bus/pci/drivers/i40e/bind", value: gpu, want: fs.ErrNotExist},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tree, emu := vfiotest.New(t, errnoNode())
			for _, s := range tc.before {
				if err := emu.WriteAttr(filepath.Join(tree.SysfsRoot, s.attr), s.value); err != nil {
					t.Fatalf("%s %q: %v", s.attr, s.value, err)
				}
			}
			path := filepath.Join(tree.SysfsRoot, tc.attr)
			err := emu.WriteAttr(path, tc.value)
			var pe *fs.PathError
			switch {
			case tc.want == nil && err != nil:
				t.Errorf("write %q: %v; want success", tc.value, err)
			case tc.want != nil && (!errors.Is(err, tc.want) || !errors.As(err, &pe) || pe.Path != path):
				t.Errorf("write %q: %v; want %v in a *fs.PathError for %s", tc.value, err, tc.want, path)
			}
			if tc.addr != "" && tree.Driver(tc.addr) != tc.then {
				t.Errorf("%s: driver %q after the write, want %q", tc.addr, tree.Driver(tc.addr), tc.then)
			}
		})
	}
}

// driver_override keeps what comes before a newline, as the kernel does,
// and a value refused leaves it as it was.
func TestWriteAttrDriverOverride(t *testing.T) {
	tree, emu := vfiotest.New(t, vfiotest.A10WithAudio())
	path := filepath.Join(tree.SysfsRoot, "bus/pci/devices/0000:65:00.0/driver_override")
	for _, tc := range []struct{ value, want string }{
		{"vfio-pci\nnvidia", "vfio-pci"},
		{strings.Repeat("x", 5000), "vfio-pci"},
		{"\n", ""},
		{"pci-stub\n", "pci-stub"},
		{"", ""},
	} {
		_ = emu.WriteAttr(path, tc.value)
		if got := tree.DriverOverride("0000:65:00.0"); got != tc.want {
			t.Errorf("after %.20q: driver_override %q, want %q", tc.value, got, tc.want)
		}
	}
	raw, _ := os.ReadFile(path)
	if string(raw) != "(null)\n" {
		t.Errorf("cleared driver_override reads %q", raw)
	}
}

// A write returns when the kernel's would: an unbind once the driver's
// remove has run, a probe once an unbind under way (here one written to the
// pipe) has finished, and an unbind whose remove hangs not before Close.
func TestWriteAttrReturnsWhenTheKernelWould(t *testing.T) {
	n := vfiotest.A10WithAudio()
	n.Devices[0].UnbindDelay = 30 * time.Millisecond
	n.Devices[1].RefuseUnbind = true
	tree, err := vfiotest.Build(t.TempDir(), n)
	if err != nil {
		t.Fatal(err)
	}
	emu, err := tree.Start()
	if err != nil {
		t.Fatal(err)
	}
	attr := func(a string) string { return filepath.Join(tree.SysfsRoot, a) }
	const gpu, audio = "0000:65:00.0", "0000:65:00.1"

	if err := emu.WriteAttr(attr("bus/pci/drivers/nvidia/unbind"), gpu); err != nil || tree.Driver(gpu) != "" {
		t.Fatalf("unbind returned %v with the driver %q still on", err, tree.Driver(gpu))
	}
	if err := emu.WriteAttr(attr("bus/pci/devices/"+gpu+"/driver_override"), "nvidia"); err != nil {
		t.Fatal(err)
	}
	if err := emu.WriteAttr(attr("bus/pci/drivers_probe"), gpu); err != nil || tree.Driver(gpu) != "nvidia" {
		t.Fatalf("probe: %v, driver %q", err, tree.Driver(gpu))
	}
	mark := len(emu.Writes())
	write(t, tree, "bus/pci/drivers/nvidia/unbind", gpu)
	settle(t, func() bool { return len(emu.Writes()) > mark }) // read: the unbind is under way
	if err := emu.WriteAttr(attr("bus/pci/drivers/nvidia/bind"), gpu); err != nil || tree.Driver(gpu) != "nvidia" {
		t.Fatalf("bind written while an unbind was under way: %v, driver %q", err, tree.Driver(gpu))
	}

	hung := make(chan error, 1)
	go func() { hung <- emu.WriteAttr(attr("bus/pci/drivers/snd_hda_intel/unbind"), audio) }()
	select {
	case err := <-hung:
		t.Fatalf("unbind of a device that never lets go returned: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	if err := emu.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-hung; err == nil {
		t.Error("the hung unbind succeeded when the emulator closed")
	}
}

// Through the pipes the writer cannot be told; Writes says what the kernel
// answered.
func TestPipeWritesRecordTheAnswer(t *testing.T) {
	tree, emu := vfiotest.New(t, vfiotest.A10WithAudio())
	write(t, tree, "bus/pci/drivers/nvidia/bind", "0000:65:00.0")
	write(t, tree, "bus/pci/drivers/vfio-pci/remove_id", "10de 2236")
	want := []string{
		"bus/pci/drivers/nvidia/bind 0000:65:00.0: device or resource busy",
		"bus/pci/drivers/vfio-pci/remove_id 10de 2236: no such device",
	}
	settle(t, func() bool {
		w := emu.Writes()
		return slices.Contains(w, want[0]) && slices.Contains(w, want[1])
	})
}
