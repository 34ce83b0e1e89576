package sandboxplugin

import (
	"fmt"
	"strings"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
)

// ResourceVendor prefixes every resource the plugin advertises.
const ResourceVendor = "nvidia.com"

func isAlnum(r rune) bool {
	return 'A' <= r && r <= 'Z' || 'a' <= r && r <= 'z' || '0' <= r && r <= '9'
}

// ValidResourceName reports whether name may follow "nvidia.com/": at most
// 63 letters, digits, '-', '_' and '.', starting and ending with a letter
// or digit.
func ValidResourceName(name string) bool {
	if name == "" || len(name) > 63 || !isAlnum(rune(name[0])) || !isAlnum(rune(name[len(name)-1])) {
		return false
	}
	for _, r := range name {
		if !isAlnum(r) && r != '-' && r != '_' && r != '.' {
			return false
		}
	}
	return true
}

// namer gives each passthrough device its resource.
type namer struct {
	pciIDs        string // --pci-ids; "" for go-nvlib's
	gpuAlias      string // P_GPU_ALIAS: all GPUs under one name
	nvswitchAlias string // NVSWITCH_ALIAS: all NVSwitches under one name

	// names is the pci.ids database, parsed for the scan in progress and
	// dropped after it (forget): parsed, NVIDIA's block alone holds about
	// 0.6 MiB of heap for a handful of names, which models keeps.
	names  *vfio.Names
	models map[[2]uint16]string // vendor, device → name part
}

func newNamer(pciIDs, gpuAlias, nvswitchAlias string) *namer {
	return &namer{pciIDs: pciIDs, gpuAlias: gpuAlias, nvswitchAlias: nvswitchAlias, models: map[[2]uint16]string{}}
}

func (n *namer) resource(p *vfio.Passthrough) string {
	alias := n.gpuAlias
	if p.Role == vfio.RoleNVSwitch {
		alias = n.nvswitchAlias
	}
	if alias != "" {
		return ResourceVendor + "/" + alias
	}
	id := [2]uint16{p.Primary.Vendor, p.Primary.Device}
	name, ok := n.models[id]
	if !ok {
		if n.names == nil {
			n.names = vfio.NewNames(n.pciIDs)
		}
		name = vfio.ModelName(n.names.Name(id[0], id[1]))
		if name == "" {
			name = fmt.Sprintf("%04x", id[1])
		}
		n.models[id] = name
	}
	return ResourceVendor + "/" + name
}

// forget drops the parsed database; a model not yet named parses it again.
func (n *namer) forget() { n.names = nil }

// envName is the KubeVirt variable that lists a resource's allocated
// addresses: PCI_RESOURCE_NVIDIA_COM_GA102GL_A10.
func envName(resource string) string {
	var b strings.Builder
	b.WriteString("PCI_RESOURCE_")
	for _, r := range strings.ToUpper(resource) {
		if 'A' <= r && r <= 'Z' || '0' <= r && r <= '9' {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	return b.String()
}
