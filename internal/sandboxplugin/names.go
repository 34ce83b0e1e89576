package sandboxplugin

import (
	"fmt"
	"regexp"
	"strings"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
)

// ResourceVendor prefixes every resource the plugin advertises.
const ResourceVendor = "nvidia.com"

var (
	spaces      = regexp.MustCompile(`\s+`)
	nameInvalid = regexp.MustCompile(`[^A-Za-z0-9_.]+`)
	validName   = regexp.MustCompile(`^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$`)
)

// ModelName turns a pci.ids device name into the name part of a resource by
// the kubevirt-gpu-device-plugin rule, so that the GPU Operator's samples
// keep working: upper case, "/" "." and white space to "_", other characters
// dropped ("GA102GL [A10]" gives "GA102GL_A10"). The result is cut to 63
// characters and trimmed to start and end with a letter or digit, as
// Kubernetes requires; a name with nothing left is "".
func ModelName(pciName string) string {
	n := strings.ToUpper(strings.TrimSpace(pciName))
	n = strings.NewReplacer("/", "_", ".", "_").Replace(n)
	n = spaces.ReplaceAllString(n, "_")
	n = nameInvalid.ReplaceAllString(n, "")
	trim := func(s string) string {
		return strings.TrimFunc(s, func(r rune) bool { return !('A' <= r && r <= 'Z' || '0' <= r && r <= '9' || 'a' <= r && r <= 'z') })
	}
	n = trim(n)
	if len(n) > 63 {
		n = trim(n[:63])
	}
	return n
}

// ValidResourceName reports whether name may follow "nvidia.com/".
func ValidResourceName(name string) bool { return validName.MatchString(name) }

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
		name = ModelName(n.names.Name(id[0], id[1]))
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
