package sandboxplugin

import (
	"strings"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
)

// ResourceVendor prefixes every resource the plugin advertises.
const ResourceVendor = "nvidia.com"

// SocketPrefix starts the name of every socket the plugin serves in the
// kubelet's directory: gpu-sandbox-nvidia.com_GA102GL_A10.sock.
const SocketPrefix = "gpu-sandbox-"

// namer gives each passthrough device its resource.
type namer struct {
	pciIDs        string // --pci-ids; "" for go-nvlib's
	gpuAlias      string // P_GPU_ALIAS: all GPUs under one name
	nvswitchAlias string // NVSWITCH_ALIAS: all NVSwitches under one name

	// names is the pci.ids lookup of the scan in progress, dropped after
	// it (forget): NVIDIA's names are read from the raw block and cost
	// nothing to keep, but another vendor's come from a whole parsed
	// database (the system's pci.ids or go-nvlib's), about 6 MiB, for a
	// handful of names that models keeps.
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
	id := [2]uint16{p.Primary.Vendor, p.Primary.DeviceID}
	name, ok := n.models[id]
	if !ok {
		if n.names == nil {
			// Checked readable at start; gone since, it names nothing.
			n.names, _ = vfio.NewNames(n.pciIDs)
		}
		pciName := ""
		if n.names != nil {
			pciName = n.names.Name(id[0], id[1])
		}
		name = vfio.ResourceName(pciName, id[1], p.Role)
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
