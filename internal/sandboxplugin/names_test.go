package sandboxplugin

import (
	"strings"
	"testing"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
)

func TestModelName(t *testing.T) {
	for in, want := range map[string]string{
		"GA102GL [A10]":                          "GA102GL_A10",
		"GH100 [H100 SXM5 80GB]":                 "GH100_H100_SXM5_80GB",
		"GH100 [H100 NVSwitch]":                  "GH100_H100_NVSWITCH",
		"GV100GL [Tesla V100 SXM2 16GB/32GB]":    "GV100GL_TESLA_V100_SXM2_16GB_32GB",
		"TU104GL [Tesla T4]":                     "TU104GL_TESLA_T4",
		"AD102GL [RTX 6000 Ada Generation]":      "AD102GL_RTX_6000_ADA_GENERATION",
		"GA100 [A100 PCIe 80GB] (rev a1)":        "GA100_A100_PCIE_80GB_REV_A1",
		"  weird   spacing\t(x) ":                "WEIRD_SPACING_X",
		"[only brackets]":                        "ONLY_BRACKETS",
		"!!!":                                    "",
		"GB202 [GeForce RTX 5090] 32GB GDDR7 ++": "GB202_GEFORCE_RTX_5090_32GB_GDDR7",
	} {
		if got := vfio.ModelName(in); got != want {
			t.Errorf("vfio.ModelName(%q) = %q, want %q", in, got, want)
		}
	}
	long := vfio.ModelName(strings.Repeat("ABCDEFGHIJ ", 10))
	if len(long) > 63 || !vfio.ValidResourceName(long) {
		t.Errorf("long name %q (%d chars) is not a valid resource name", long, len(long))
	}
}

func TestEnvName(t *testing.T) {
	for in, want := range map[string]string{
		"nvidia.com/GA102GL_A10": "PCI_RESOURCE_NVIDIA_COM_GA102GL_A10",
		"nvidia.com/pgpu":        "PCI_RESOURCE_NVIDIA_COM_PGPU",
		"nvidia.com/nvswitch":    "PCI_RESOURCE_NVIDIA_COM_NVSWITCH",
	} {
		if got := envName(in); got != want {
			t.Errorf("envName(%q) = %q, want %q", in, got, want)
		}
	}
}
