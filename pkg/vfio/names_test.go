package vfio_test

import (
	"bufio"
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/NVIDIA/go-nvlib/pkg/pciids"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
)

// deviceIDs lists the device ids of a vendor's block in a pci.ids file.
func deviceIDs(t *testing.T, data []byte, vendor string) []uint16 {
	t.Helper()
	var ids []uint16
	in := false
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, vendor+"  "):
			in = true
		case in && strings.HasPrefix(line, "\t") && !strings.HasPrefix(line, "\t\t"):
			id, err := strconv.ParseUint(strings.TrimSpace(line)[:4], 16, 16)
			if err != nil {
				t.Fatalf("device line %q: %v", line, err)
			}
			ids = append(ids, uint16(id))
		case in && line != "" && line[0] != '\t' && line[0] != '#':
			in = false
		}
	}
	return ids
}

// Every NVIDIA device in the block we embed gets the name go-nvlib's parser
// gives it, read from the same bytes.
func TestNamesAgreeWithGoNvlibOnNVIDIAsBlock(t *testing.T) {
	data, err := os.ReadFile("pci-nvidia.ids")
	if err != nil {
		t.Fatal(err)
	}
	// go-nvlib's parser wants a class section after the vendors.
	file := filepath.Join(t.TempDir(), "pci.ids")
	if err := os.WriteFile(file, append(data, "\nC 00  Unclassified device\n"...), 0o600); err != nil {
		t.Fatal(err)
	}
	ref := pciids.NewDB(pciids.WithFilePath(file))
	names, err := vfio.NewNames("")
	if err != nil {
		t.Fatal(err)
	}
	ids := deviceIDs(t, data, "10de")
	if len(ids) < 1000 {
		t.Fatalf("%d NVIDIA devices in pci-nvidia.ids; want the whole block", len(ids))
	}
	for _, id := range ids {
		want, err := ref.GetDeviceName(vfio.VendorNVIDIA, id)
		if err != nil {
			t.Fatalf("go-nvlib: 10de:%04x: %v", id, err)
		}
		if got := names.Name(vfio.VendorNVIDIA, id); got != want {
			t.Errorf("10de:%04x: %q; go-nvlib says %q", id, got, want)
		}
	}
	if got := names.Name(vfio.VendorNVIDIA, 0x3ffe); got != "" {
		t.Errorf("10de:3ffe, not in pci.ids: %q; want no name", got)
	}
}

// A pci.ids of a distribution's shape, given with --pci-ids: several
// vendors, comments, subsystem lines (two tabs) whose ids match a device's,
// a name with no space after its id's two, and the class section.
const distroPCIIDs = `#
#	List of PCI ID's
#
#	Version: 2023.01.10
#
# Vendors, devices and subsystems. Please keep sorted.

10b5  Broadcom / LSI
	c010  PEX880xx PCIe Gen 4 Switch
		10de 1647  PEX88080 on HGX
10de  NVIDIA Corporation
# a comment inside the block
	2236  GA102GL [A10]
		10de 1482  GA102GL [A10]
	2330  GH100[H100 SXM5 80GB]
	2336  	 GH100 [H100 SXM5 96GB]  
		2236 0001  not a device line
	22a3  GH100 [H100 NVSwitch]
	22a3  GH100 [H100 NVSwitch], listed twice
10df  Emulex Corporation
	2236  not NVIDIA's
1af4  Red Hat, Inc.
	1041  Virtio 1.0 network device

C 00  Unclassified device
	00  Non-VGA unclassified device
C 03  Display controller
	02  3D controller
`

func TestNamesFromAPCIIDsFile(t *testing.T) {
	file := filepath.Join(t.TempDir(), "pci.ids")
	if err := os.WriteFile(file, []byte(distroPCIIDs), 0o600); err != nil {
		t.Fatal(err)
	}
	ref := pciids.NewDB(pciids.WithFilePath(file))
	names, err := vfio.NewNames(file)
	if err != nil {
		t.Fatal(err)
	}
	for vendor, hex := range map[uint16]string{0x10b5: "10b5", vfio.VendorNVIDIA: "10de", 0x10df: "10df", 0x1af4: "1af4"} {
		for _, id := range deviceIDs(t, []byte(distroPCIIDs), hex) {
			want, err := ref.GetDeviceName(vendor, id)
			if err != nil {
				t.Fatalf("go-nvlib: %s:%04x: %v", hex, id, err)
			}
			if got := names.Name(vendor, id); got != want {
				t.Errorf("%s:%04x: %q; go-nvlib says %q", hex, id, got, want)
			}
		}
	}
	for _, c := range []struct {
		vendor, device uint16
		want           string
	}{
		{vfio.VendorNVIDIA, 0x2330, "GH100[H100 SXM5 80GB]"}, // the distribution's spelling, as given
		{vfio.VendorNVIDIA, 0x2336, "GH100 [H100 SXM5 96GB]"},
		{vfio.VendorNVIDIA, 0x22a3, "GH100 [H100 NVSwitch], listed twice"}, // the last line wins
		{vfio.VendorNVIDIA, 0x1647, ""},                                    // a subsystem line, not a device
		{vfio.VendorNVIDIA, 0x0001, ""},
		{0x10df, 0x2236, "not NVIDIA's"},
		{0x8086, 0x1572, ""}, // a vendor the file does not have
	} {
		if got := names.Name(c.vendor, c.device); got != c.want {
			t.Errorf("%04x:%04x: %q; want %q", c.vendor, c.device, got, c.want)
		}
	}
	// The file is read at each lookup: gone, it names nothing.
	if err := os.Remove(file); err != nil {
		t.Fatal(err)
	}
	if got := names.Name(vfio.VendorNVIDIA, 0x2236); got != "" {
		t.Errorf("pci.ids removed: %q; want no name", got)
	}
}

// Naming a GPU is on the device plugin's path to registering.
func BenchmarkName(b *testing.B) {
	names, err := vfio.NewNames("")
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if names.Name(vfio.VendorNVIDIA, 0x2330) == "" {
			b.Fatal("no name for the H100")
		}
	}
}
