package cdi_test

import (
	"fmt"
	"os"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/cdi"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
)

// Writing the nvidia.com/pgpu spec for a node whose GPU vfio holds.
func Example() {
	dir, _ := os.MkdirTemp("", "cdi-example-")
	defer os.RemoveAll(dir)
	tree, _ := vfiotest.Build(dir, vfiotest.BoundToVFIO(vfiotest.A10WithAudio()))
	sysfs := vfio.NewSysfs(tree.SysfsRoot)
	devices, _ := sysfs.Devices()
	sel, _ := vfio.ParseSelector(vfio.DefaultSelect, false)

	spec, err := cdi.NewPassthroughSpec(vfio.FindPassthrough(devices, sel), cdi.NodeOptions{Sysfs: sysfs})
	if err != nil {
		fmt.Println(err)
		return
	}
	w, _ := cdi.NewWriter(dir + "/cdi") // cdi.DefaultRoot on a node
	wrote, err := w.Write(spec)
	fmt.Println(wrote, err)
	for _, d := range spec.Devices {
		fmt.Println(cdi.QualifiedName(spec.Kind, d.Name), d.ContainerEdits.DeviceNodes[0].Path)
	}
	fmt.Println("common:", spec.ContainerEdits.DeviceNodes[0].Path)
	// Output:
	// true <nil>
	// nvidia.com/pgpu=0 /dev/vfio/21
	// nvidia.com/pgpu=0000:65:00.0 /dev/vfio/21
	// nvidia.com/pgpu=0000:65:00.1 /dev/vfio/21
	// nvidia.com/pgpu=21 /dev/vfio/21
	// common: /dev/vfio/vfio
}
