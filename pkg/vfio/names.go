package vfio

import (
	"bytes"
	_ "embed"
	"fmt"
	"os"
	"strings"
	"sync"

	"github.com/NVIDIA/go-nvlib/pkg/pciids"
)

// nvidiaPCIIDs is NVIDIA's block of the pci.ids that go-nvlib embeds (same
// version; hack/update-pci-ids.sh cuts it). Names come from go-nvlib's data
// rather than the node's /usr/share/misc/pci.ids so that a GPU model gets
// the same resource name on every node, whatever its distribution ships
// (Debian 12's copy spells the H100 "GH100[H100 SXM5 80GB]").
//
//go:embed pci-nvidia.ids
var nvidiaPCIIDs []byte

// Names looks up device names in pci.ids. NVIDIA's names are read straight
// from its block, found line by line as go-nvlib's parser reads them: parsed
// with that parser, the block alone took 1.7 to 5.5 ms of every start of the
// device plugin (its resources are named before it registers), and the
// whole database 17 ms and 6 MiB. A file given with --pci-ids is read the
// same way. Another vendor's device, without a file, is looked up by
// go-nvlib's parser in the system's pci.ids, else in go-nvlib's copy,
// parsed once when first needed.
type Names struct {
	path string

	mu   sync.Mutex
	full pciids.Interface
}

// NewNames returns a lookup on the pci.ids file at path, or when path is ""
// on go-nvlib's copy. A path that cannot be read is an error, not a
// database that knows no names. The file is read again for each lookup;
// should it go away later, its devices have no names.
func NewNames(path string) (*Names, error) {
	if path != "" {
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("pci.ids: %w", err)
		}
		f.Close()
	}
	return &Names{path: path}, nil
}

// Name returns the device's pci.ids name (e.g. "GH100 [H100 SXM5 80GB]"),
// or "" when the database does not know it.
func (n *Names) Name(vendor, device uint16) string {
	var data []byte
	switch {
	case n.path != "":
		data, _ = os.ReadFile(n.path)
	case vendor == VendorNVIDIA:
		data = nvidiaPCIIDs
	default:
		n.mu.Lock()
		defer n.mu.Unlock()
		if n.full == nil {
			n.full = pciids.NewDB()
		}
		name, err := n.full.GetDeviceName(vendor, device)
		if err != nil {
			return ""
		}
		return name
	}
	return deviceName(vendorSection(data, vendor), device)
}

// deviceName finds the device's line in a vendor's block of pci.ids: one
// tab, four hex digits, the name (subsystem lines have two tabs). Its id
// and name are trimmed as go-nvlib's parser trims them, and of two lines
// for one device the last wins, as there.
func deviceName(section []byte, device uint16) string {
	name := ""
	for len(section) > 0 {
		line := section
		if i := bytes.IndexByte(section, '\n'); i >= 0 {
			line, section = section[:i], section[i+1:]
		} else {
			section = nil
		}
		if len(line) < 2 || line[0] != '\t' || line[1] == '\t' {
			continue
		}
		entry := bytes.TrimSpace(line)
		if id, ok := hex4(entry); ok && id == device {
			name = string(bytes.TrimSpace(entry[4:]))
		}
	}
	return name
}

// hex4 parses the four hex digits that start b.
func hex4(b []byte) (uint16, bool) {
	if len(b) < 4 {
		return 0, false
	}
	var v uint16
	for _, c := range b[:4] {
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c -= 'a' - 10
		case 'A' <= c && c <= 'F':
			c -= 'A' - 10
		default:
			return 0, false
		}
		v = v<<4 | uint16(c)
	}
	return v, true
}

// vendorSection cuts the vendor's block out of a pci.ids file: its line
// and the device lines under it.
func vendorSection(b []byte, vendor uint16) []byte {
	head := fmt.Appendf(nil, "\n%04x  ", vendor)
	start := 0
	if !bytes.HasPrefix(b, head[1:]) {
		i := bytes.Index(b, head)
		if i < 0 {
			return nil
		}
		start = i + 1
	}
	end := start + bytes.IndexByte(b[start:], '\n') + 1
	for end < len(b) && (b[end] == '\t' || b[end] == '#') {
		next := bytes.IndexByte(b[end:], '\n')
		if next < 0 {
			end = len(b)
			break
		}
		end += next + 1
	}
	return b[start:end]
}

// ModelName turns a pci.ids device name into the name part of a resource by
// the kubevirt-gpu-device-plugin rule, so that the GPU Operator's samples
// keep working: upper case, "/" "." and white space to "_", other characters
// dropped ("GA102GL [A10]" gives "GA102GL_A10"). The result is cut to 63
// characters and trimmed to start and end with a letter or digit, as
// Kubernetes requires; a name with nothing left is "".
//
// It takes no regular expressions: compiled at start, the three it took
// cost every start 0.2 ms and 46 kB for a few names.
func ModelName(pciName string) string {
	var b strings.Builder
	space := false
	for _, r := range strings.ToUpper(strings.TrimSpace(pciName)) {
		if r == ' ' || r == '\t' || r == '\n' || r == '\f' || r == '\r' { // RE2's \s
			if !space {
				b.WriteByte('_')
			}
			space = true
			continue
		}
		// A character dropped below still ends a run of white space: the
		// rule turns the runs into "_" before it drops anything.
		space = false
		switch {
		case r == '/' || r == '.':
			b.WriteByte('_')
		case r == '_' || isAlnum(r):
			b.WriteRune(r)
		}
	}
	trim := func(s string) string { return strings.TrimFunc(s, func(r rune) bool { return !isAlnum(r) }) }
	n := trim(b.String())
	if len(n) > 63 {
		n = trim(n[:63])
	}
	return n
}

func isAlnum(r rune) bool {
	return 'A' <= r && r <= 'Z' || 'a' <= r && r <= 'z' || '0' <= r && r <= '9'
}

// ResourceName is the name part of a device's extended resource, which is
// also its CDI kind (Kata's cold plug asks the CDI cache for
// <resource>=<device ID>): the model as pci.ids names it (ModelName), or,
// when pci.ids does not know the device or its name makes no valid kind (it
// starts with a digit), "pgpu-" (an NVSwitch: "nvswitch-") and the device
// id: pgpu-3ffe. kubevirt-gpu-device-plugin names such a GPU 3ffe, which no
// CDI kind can be.
func ResourceName(pciName string, deviceID uint16, role Role) string {
	if name := ModelName(pciName); ValidResourceName(name) {
		return name
	}
	prefix := "pgpu-"
	if role == RoleNVSwitch {
		prefix = "nvswitch-"
	}
	return fmt.Sprintf("%s%04x", prefix, deviceID)
}

// ValidResourceName reports whether name may follow "nvidia.com/" both as
// an extended resource name and as a CDI class, since the one is the
// other: at most 63 letters, digits, '-', '_' and '.', starting with a
// letter and ending with a letter or digit (Kubernetes also allows a
// leading digit, CDI does not).
func ValidResourceName(name string) bool {
	if name == "" || len(name) > 63 || !isLetter(rune(name[0])) || !isAlnum(rune(name[len(name)-1])) {
		return false
	}
	for _, r := range name {
		if !isAlnum(r) && r != '-' && r != '_' && r != '.' {
			return false
		}
	}
	return true
}

func isLetter(r rune) bool { return 'A' <= r && r <= 'Z' || 'a' <= r && r <= 'z' }
