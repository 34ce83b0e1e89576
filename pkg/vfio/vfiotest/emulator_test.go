package vfiotest_test

import (
	"os"
	"path/filepath"
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
