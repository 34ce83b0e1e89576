package e2e

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// make demo is the first command a newcomer runs: it must keep working and
// keep showing what the README promises.
func TestDemo(t *testing.T) {
	cmd := exec.Command("go", "run", "./test/e2e/cmd/demo")
	cmd.Dir = repoRoot()
	cmd.Env = os.Environ()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("make demo: %v\n%s", err, out)
	}
	for _, want := range []string{
		"bind: 12 bound",
		"nvidia.com/GH100_H100_SXM5_80GB: 8",
		"nvidia.com/nvswitch: 4",
		"nvidia.com/pgpu=0",
		"runtime_type = 'io.containerd.kata-qemu-nvidia-gpu.v2'",
		"env     PCI_RESOURCE_NVIDIA_COM_GH100_H100_SXM5_80GB=",
		"CDI specs kept: all (", "; kata-qemu-nvidia-gpu still registered: true",
		"given back byte for byte: true",
		"CDI specs left: 0",
		// The mixed node: 8 to 4 while a VM holds GPUs 1 and 6.
		"given back to the host, no longer for VMs: 0000:05:00.0, 0000:06:00.0, 0000:07:00.0, 0000:08:00.0, 0000:5d:00.0, 0000:9a:00.0, 0000:ab:00.0, 0000:db:00.0",
		"the device plugin follows: nvidia.com/GH100_H100_SXM5_80GB: 4",
		"unbind: 4 unbound (0000:18:00.0, 0000:2a:00.0, 0000:3a:00.0, 0000:ba:00.0)",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out)
		}
	}
}
