package kata_test

import (
	"fmt"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/kata"
)

// Finding a runtime class's configuration in an artifact and pointing it at
// the artifact's kernel and initrd.
func Example() {
	files := []string{"configuration-nvidia-gpu-qemu.toml", "vmlinuz-6.1.62-nvidia-gpu", "jammy.initrd"}
	name, _ := kata.ConfigFor("kata-qemu-nvidia-gpu", files)
	fmt.Println(name)

	config := "[hypervisor.qemu]\nkernel = \"/opt/kata/share/vmlinuz-6.1.62-nvidia-gpu\" # guest\ninitrd = \"/opt/kata/share/kata.initrd\"\n"
	out, err := kata.Rewrite([]byte(config), "/var/lib/artifacts/kata-qemu-nvidia-gpu", files, kata.Options{})
	fmt.Print(string(out), err, "\n")
	// Output:
	// configuration-nvidia-gpu-qemu.toml
	// [hypervisor.qemu]
	// kernel = "/var/lib/artifacts/kata-qemu-nvidia-gpu/vmlinuz-6.1.62-nvidia-gpu" # guest
	// initrd = "/var/lib/artifacts/kata-qemu-nvidia-gpu/jammy.initrd"
	// <nil>
}
