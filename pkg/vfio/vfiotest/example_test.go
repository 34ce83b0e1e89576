package vfiotest_test

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
)

// A fake node with an A10 and its audio function, and the emulator
// answering a driver change the way the kernel does.
func Example() {
	dir, _ := os.MkdirTemp("", "vfiotest-example-")
	defer os.RemoveAll(dir)
	tree, _ := vfiotest.Build(dir, vfiotest.A10WithAudio())
	emu, _ := tree.Start()
	defer emu.Close()

	fmt.Println(tree.Driver("0000:65:00.0"), tree.DriverOverride("0000:65:00.0") == "")
	write := func(attr, value string) { os.WriteFile(filepath.Join(tree.SysfsRoot, attr), []byte(value), 0) }
	write("bus/pci/devices/0000:65:00.0/driver_override", "vfio-pci")
	write("bus/pci/drivers/nvidia/unbind", "0000:65:00.0")
	write("bus/pci/drivers_probe", "0000:65:00.0")
	for tree.Driver("0000:65:00.0") != "vfio-pci" { // the emulator answers after the write returns
		time.Sleep(time.Millisecond)
	}
	_, err := os.Stat(tree.GroupNode(21))
	fmt.Println(tree.Driver("0000:65:00.0"), err == nil)
	// Output:
	// nvidia true
	// vfio-pci true
}
