package vfio_test

import (
	"context"
	"fmt"
	"os"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
)

// Binding the GPU of a fake node and its audio function, which shares the
// GPU's IOMMU group, then giving both back.
func Example() {
	dir, _ := os.MkdirTemp("", "vfio-example-")
	defer os.RemoveAll(dir)
	tree, _ := vfiotest.Build(dir, vfiotest.A10WithAudio())
	emu, _ := tree.Start()
	defer emu.Close()

	m := vfio.NewManager(dir+"/state", // where the previous drivers are kept
		vfio.WithSysfsRoot(tree.SysfsRoot), // "/sys" on a node
		vfio.WithDevRoot(tree.DevRoot),
		vfio.WithHostRoot(tree.HostRoot),
	)
	devices, _ := m.Sysfs().Devices()
	sel, _ := vfio.ParseSelector(vfio.DefaultSelect, false)
	plan, _ := vfio.NewPlanAll(devices, sel)

	res, err := m.Bind(context.Background(), plan)
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, o := range res.Outcomes {
		fmt.Printf("%s %-9s %s: %s -> %s\n", o.Address, o.Role, o.Action, o.From, o.To)
	}
	for _, o := range m.Unbind(context.Background(), plan, vfio.UnbindOptions{}).Outcomes {
		fmt.Printf("%s %-9s %s: %s -> %s\n", o.Address, o.Role, o.Action, o.From, o.To)
	}
	// Output:
	// 0000:65:00.0 gpu       bound: nvidia -> vfio-pci
	// 0000:65:00.1 companion bound: snd_hda_intel -> vfio-pci
	// 0000:65:00.0 gpu       unbound: vfio-pci -> nvidia
	// 0000:65:00.1 companion unbound: vfio-pci -> snd_hda_intel
}
