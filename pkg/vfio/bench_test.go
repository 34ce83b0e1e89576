package vfio_test

import (
	"fmt"
	"testing"

	"github.com/NVIDIA/go-nvlib/pkg/nvpci"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/cdi"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
)

// synthetic64 is a node with 64 GPUs, each behind its own switch port.
func synthetic64() vfiotest.Node {
	n := vfiotest.Node{Drivers: []string{"vfio-pci"}}
	for i := range 64 {
		bus := 0x10 + 2*i
		port := fmt.Sprintf("0000:%02x:00.0", bus)
		n.Devices = append(n.Devices,
			vfiotest.Device{Address: port, Vendor: 0x1000, DeviceID: 0xc030, Class: vfiotest.ClassBridge,
				Driver: "pcieport", IOMMUGroup: 200 + i, NUMANode: i / 32},
			vfiotest.Device{Address: fmt.Sprintf("0000:%02x:00.0", bus+1), Vendor: vfiotest.VendorNVIDIA,
				DeviceID: vfiotest.DeviceH100SXM, Class: vfiotest.Class3D, Driver: "vfio-pci",
				IOMMUGroup: i, NUMANode: i / 32, Parent: port})
	}
	return n
}

// BenchmarkDiscovery reads every device, finds the passthrough groups and
// builds the nvidia.com/pgpu CDI spec, as the device plugin does on each
// change; nvpci only reads the same tree.
func BenchmarkDiscovery(b *testing.B) {
	for name, node := range map[string]vfiotest.Node{
		"hgx":     vfiotest.BoundToVFIO(vfiotest.HGXH100()),
		"64-gpus": synthetic64(),
	} {
		tree, err := vfiotest.Build(b.TempDir(), node)
		if err != nil {
			b.Fatal(err)
		}
		sel, _ := vfio.ParseSelector("", true)
		b.Run(name+"/pkg-vfio", func(b *testing.B) {
			s := vfio.NewSysfs(tree.SysfsRoot)
			for b.Loop() {
				devices, err := s.Devices()
				if err != nil {
					b.Fatal(err)
				}
				if _, err := cdi.NewPassthroughSpec(vfio.FindPassthrough(devices, sel), cdi.NodeOptions{Sysfs: s}); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(name+"/nvpci", func(b *testing.B) {
			nv := nvpci.New(nvpci.WithPCIDevicesRoot(tree.SysfsRoot+"/bus/pci/devices"), nvpci.WithLogger(quiet{}))
			for b.Loop() {
				if _, err := nv.GetAllDevices(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// quiet drops nvpci's warnings (no vfio cdev on a legacy node, one per device).
type quiet struct{}

func (quiet) Warningf(string, ...any) {}
func (quiet) Debugf(string, ...any)   {}
func (quiet) Infof(string, ...any)    {}
