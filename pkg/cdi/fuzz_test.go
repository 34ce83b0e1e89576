package cdi_test

import (
	"fmt"
	"testing"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/cdi"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
)

// Specs for any set of passthrough devices are valid for the CDI library:
// the writer (which validates through the library's cache) accepts them.
func FuzzSpec(f *testing.F) {
	f.Add(uint8(0x18), uint8(20), uint8(3), true)
	f.Add(uint8(0), uint8(0), uint8(1), false)
	f.Add(uint8(255), uint8(255), uint8(16), true)
	f.Fuzz(func(t *testing.T, bus, group, n uint8, iommufd bool) {
		var devices []*vfio.Passthrough
		for i := range int(n%17) + 1 {
			addr := fmt.Sprintf("0000:%02x:%02x.0", bus, i)
			fn := &vfio.Device{Address: addr, Driver: "vfio-pci", IOMMUGroup: int(group) + i, VFIODevice: fmt.Sprintf("vfio%d", i)}
			devices = append(devices, &vfio.Passthrough{ID: addr, Role: vfio.RoleGPU, Primary: fn,
				Functions: []*vfio.Device{fn}, IOMMUGroup: fn.IOMMUGroup})
		}
		mode := vfio.ModeLegacy
		if iommufd {
			mode = vfio.ModeIOMMUFD
		}
		spec, err := cdi.NewPassthroughSpec(devices, cdi.SpecOptions{Mode: mode})
		if err != nil {
			t.Fatal(err)
		}
		if len(spec.Devices) != 2*len(devices) {
			t.Fatalf("%d devices named, want %d", len(spec.Devices), 2*len(devices))
		}
		w, err := cdi.NewWriter(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(spec); err != nil {
			t.Fatalf("the CDI library refuses the spec: %v", err)
		}
	})
}
