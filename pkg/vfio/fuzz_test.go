package vfio_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
)

// Whatever a device's attribute files hold, reading it gives a device or an
// error, never a panic, and ids that parse are the ones written.
func FuzzDeviceAttributes(f *testing.F) {
	f.Add("0x10de\n", "0x2330\n", "0x030200\n", "0\n", "21", "nvidia")
	f.Add("10de", "", "0x", "-1", "x", "")
	f.Add("0x10de0", "0xzz", "0x0302000000", "999999999999999999999", "../../..", "a/b")
	f.Fuzz(func(t *testing.T, vendor, device, class, numa, group, driver string) {
		root := t.TempDir()
		dir := filepath.Join(root, "devices", "0000:65:00.0")
		os.MkdirAll(dir, 0o755)
		os.MkdirAll(filepath.Join(root, "bus", "pci", "devices"), 0o755)
		os.Symlink(dir, filepath.Join(root, "bus", "pci", "devices", "0000:65:00.0"))
		for name, v := range map[string]string{"vendor": vendor, "device": device, "class": class, "numa_node": numa} {
			os.WriteFile(filepath.Join(dir, name), []byte(v), 0o644)
		}
		if group != "" {
			os.Symlink("../kernel/iommu_groups/"+group, filepath.Join(dir, "iommu_group"))
		}
		if driver != "" {
			os.Symlink("../bus/pci/drivers/"+driver, filepath.Join(dir, "driver"))
		}
		d, err := vfio.NewSysfs(root).Device("0000:65:00.0")
		if err != nil {
			return
		}
		if d.NUMANode < -1 || d.IOMMUGroup < -1 {
			t.Fatalf("read %+v", d)
		}
	})
}
