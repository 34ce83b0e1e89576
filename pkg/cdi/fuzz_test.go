package cdi_test

import (
	"fmt"
	"strconv"
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
		spec, err := cdi.NewPassthroughSpec(devices, cdi.NodeOptions{Mode: mode})
		if err != nil {
			t.Fatal(err)
		}
		// By index and address; by vfioN; by group number unless an
		// index has it; and each name opens its own device's nodes.
		want := 3 * len(devices)
		nodes := map[string]string{}
		for _, d := range spec.Devices {
			nodes[d.Name] = d.ContainerEdits.DeviceNodes[0].Path
		}
		for i, d := range devices {
			names := []string{strconv.Itoa(i), d.ID, d.Primary.VFIODevice}
			if g := strconv.Itoa(d.IOMMUGroup); d.IOMMUGroup >= len(devices) {
				names = append(names, g)
				want++
			}
			for _, name := range names {
				if nodes[name] != nodes[d.ID] || nodes[name] == "" {
					t.Errorf("%s opens %q; its device %s opens %q", name, nodes[name], d.ID, nodes[d.ID])
				}
			}
		}
		if len(spec.Devices) != want || len(nodes) != want {
			t.Fatalf("%d devices named (%d names), want %d", len(spec.Devices), len(nodes), want)
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
