package vfio_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/NVIDIA/go-nvlib/pkg/nvpci"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
)

// go-nvlib's own mock trees must read the same through both libraries, so
// that code moving from nvpci to pkg/vfio sees the same devices.
func TestDevicesMatchNVPCI(t *testing.T) {
	mock, err := nvpci.NewMockNvpci()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(mock.Cleanup)
	if err := mock.AddMockA100("0000:80:05.1", 0, nil); err != nil {
		t.Fatal(err)
	}
	sriov := &nvpci.SriovInfo{PhysicalFunction: &nvpci.SriovPhysicalFunction{TotalVFs: 8, NumVFs: 2}}
	if err := mock.AddMockA100("0000:81:00.0", 1, sriov); err != nil {
		t.Fatal(err)
	}
	want, err := mock.GetAllDevices()
	if err != nil {
		t.Fatal(err)
	}
	if len(want) != 4 {
		t.Fatalf("nvpci mock has %d devices, want 4 (2 GPUs, 2 VFs)", len(want))
	}

	// nvpci reads the bus's device directory directly; give it a sysfs root.
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "bus", "pci"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Dir(want[0].Path), filepath.Join(root, "bus", "pci", "devices")); err != nil {
		t.Fatal(err)
	}
	got, err := vfio.NewSysfs(root).Devices()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("pkg/vfio read %d devices, nvpci %d", len(got), len(want))
	}
	names, _ := vfio.NewNames("")
	for i, w := range want {
		g := got[i]
		pf := ""
		if w.SriovInfo.IsVF() {
			pf = w.SriovInfo.VirtualFunction.PhysicalFunction.Address
		}
		// nvpci takes a vfio-dev/vfioN directory for a cdev; its mock, like
		// Debian's 6.1 kernel, has no dev attribute in it, so there is no
		// node to open and pkg/vfio reports none (the one place the two differ).
		wantCDev := w.IommuFD
		if _, err := os.Stat(filepath.Join(root, "bus/pci/devices", w.Address, "vfio-dev", w.IommuFD, "dev")); err != nil {
			wantCDev = ""
		}
		totalVFs := 0
		if w.SriovInfo.IsPF() {
			totalVFs = int(w.SriovInfo.PhysicalFunction.TotalVFs)
		}
		for _, c := range []struct {
			field     string
			got, want any
		}{
			{"address", g.Address, w.Address},
			{"vendor", g.Vendor, w.Vendor},
			{"device", g.DeviceID, w.Device},
			{"class", g.Class, w.Class},
			{"subsystem vendor", g.SubsystemVendor, w.SubsystemVendor},
			{"subsystem device", g.SubsystemDevice, w.SubsystemDevice},
			{"driver", g.Driver, w.Driver},
			{"iommu group", g.IOMMUGroup, w.IommuGroup},
			{"numa node", g.NUMANode, w.NumaNode},
			{"vfio cdev", g.VFIODevice, wantCDev},
			{"physical function", g.PhysFn, pf},
			{"total VFs", g.TotalVFs, totalVFs},
			{"name", names.Name(g.Vendor, g.DeviceID), w.DeviceName},
			{"is GPU", g.IsGPU(), w.IsGPU()},
		} {
			if c.got != c.want {
				t.Errorf("%s: %s = %v through pkg/vfio, %v through nvpci", w.Address, c.field, c.got, c.want)
			}
		}
	}
}

func TestDevicesOnFakeTree(t *testing.T) {
	tree, err := vfiotest.Build(t.TempDir(), vfiotest.HGXH100())
	if err != nil {
		t.Fatal(err)
	}
	devices, err := vfio.NewSysfs(tree.SysfsRoot).Devices()
	if err != nil {
		t.Fatal(err)
	}
	byAddr := map[string]*vfio.Device{}
	for _, d := range devices {
		byAddr[d.Address] = d
	}
	gpu := byAddr["0000:9a:00.0"]
	if gpu == nil {
		t.Fatal("GPU 0000:9a:00.0 not found")
	}
	want := vfio.Device{Address: "0000:9a:00.0", Vendor: 0x10de, DeviceID: 0x2330, Class: 0x030200,
		SubsystemVendor: 0x10de, SubsystemDevice: 0x16c1, Driver: "nvidia", IOMMUGroup: 24, NUMANode: 1,
		Parent:   "0000:99:00.0",
		Modalias: "pci:v000010DEd00002330sv000010DEsd000016C1bc03sc02i00"}
	want.Path = gpu.Path
	if *gpu != want {
		t.Errorf("read %+v\nwant %+v", *gpu, want)
	}
	names, err := vfio.NewNames("")
	if err != nil {
		t.Fatal(err)
	}
	if n := names.Name(gpu.Vendor, gpu.DeviceID); n != "GH100 [H100 SXM5 80GB]" {
		t.Errorf("name = %q", n)
	}
	if c, _ := vfio.NewSysfs(tree.SysfsRoot).IOMMUGroupCount(); c != 20 {
		t.Errorf("IOMMU groups = %d, want 20 (8 GPUs, 8 switch ports, 4 NVSwitches)", c)
	}
}

// One device with an unreadable identity is reported and skipped; the scan
// goes on with the others.
func TestDevicesSkipsBrokenDevice(t *testing.T) {
	tree, err := vfiotest.Build(t.TempDir(), vfiotest.A10WithAudio())
	if err != nil {
		t.Fatal(err)
	}
	s := vfio.NewSysfs(tree.SysfsRoot)
	if err := os.Remove(filepath.Join(s.DevicePath("0000:65:00.1"), "class")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(s.DevicePath("0000:65:00.0"), "numa_node"), []byte("garbage\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	devices, err := s.Devices()
	if err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("error = %v; want the missing class file reported", err)
	}
	if len(devices) != 1 || devices[0].Address != "0000:65:00.0" || devices[0].NUMANode != -1 {
		t.Fatalf("devices = %+v; want only 0000:65:00.0 with no NUMA node", devices)
	}
	if _, err := s.Device("0000:99:00.0"); !errors.Is(err, vfio.ErrDeviceNotFound) {
		t.Errorf("unknown device error = %v", err)
	}
}

// A pci.ids the caller names and that cannot be read is an error, not a
// database without names (every resource would be named by device id).
func TestNewNamesUnreadable(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "pci.ids")
	if _, err := vfio.NewNames(missing); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("NewNames(%s) = %v; want an error naming the file", missing, err)
	}
}

func TestReadLinkBase(t *testing.T) {
	dir := t.TempDir()
	long := strings.Repeat("d/", 200) + "vfio-pci" // past the stack buffer
	for name, target := range map[string]string{
		"driver": "../../../bus/pci/drivers/vfio-pci", "slash": "../drivers/nvidia/", "bare": "vfio-pci", "long": long,
	} {
		if err := os.Symlink(target, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "file"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{"driver": "vfio-pci", "slash": "nvidia", "bare": "vfio-pci", "long": "vfio-pci", "missing": ""} {
		if got, err := vfio.ReadLinkBase(filepath.Join(dir, name)); got != want || err != nil {
			t.Errorf("%s: %q, %v; want %q", name, got, err, want)
		}
	}
	if _, err := vfio.ReadLinkBase(filepath.Join(dir, "file")); err == nil || !strings.Contains(err.Error(), "file") {
		t.Errorf("not a link: %v; want an error naming it", err)
	}
}
