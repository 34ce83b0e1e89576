package policy_test

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/policy"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
)

func TestParse(t *testing.T) {
	for in, want := range map[string]string{
		"all":                        "all",
		" ALL ":                      "all",
		"none":                       "none",
		"0":                          "none",
		"4":                          "4",
		"0000:18:00.0,0000:2a:00.0":  "0000:18:00.0,0000:2a:00.0",
		"18:00.0, 2A:00.0":           "0000:18:00.0,0000:2a:00.0",
		"numa1":                      "numa1",
		"gpu0,GPU3,gpu0":             "gpu0,gpu3",
		"ga102gl_a10":                "GA102GL_A10",
		"numa0,GH100_H100_SXM5_80GB": "numa0,GH100_H100_SXM5_80GB",
		"pgpu-3ffe":                  "PGPU-3FFE", // a GPU pci.ids does not know
	} {
		p, err := policy.Parse(in)
		if err != nil {
			t.Errorf("Parse(%q): %v", in, err)
			continue
		}
		if p.String() != want {
			t.Errorf("Parse(%q) = %q, want %q", in, p, want)
		}
	}
	for in, why := range map[string]string{
		"":                     "empty",
		"four":                 "no gpu<N>",
		"0,1":                  "bare number",
		"-1":                   "no gpu<N>",
		"-3ffe":                "no gpu<N>",
		"gpu0,,gpu1":           "empty item",
		"0000:zz:00.0":         "invalid PCI address",
		"99999999999999999999": "out of range",
		"GA102GL [A10]":        "no gpu<N>",
	} {
		_, err := policy.Parse(in)
		if !errors.Is(err, policy.ErrInvalid) || !strings.Contains(err.Error(), why) || !strings.Contains(err.Error(), `"`+in+`"`) {
			t.Errorf("Parse(%q) = %v; want ErrInvalid quoting the value and saying %q", in, err, why)
		}
	}
}

// node reads a fake node as the agent reads a real one: GPUs from sysfs,
// models from pci.ids.
func node(t *testing.T, n vfiotest.Node, held ...string) policy.Node {
	t.Helper()
	tree, _ := vfiotest.New(t, n)
	devices, err := vfio.NewSysfs(tree.SysfsRoot).Devices()
	if err != nil {
		t.Fatal(err)
	}
	sel, err := vfio.ParseSelector("10de", false)
	if err != nil {
		t.Fatal(err)
	}
	names, _ := vfio.NewNames("")
	model := func(d *vfio.Device) string { return vfio.ModelName(names.Name(d.Vendor, d.DeviceID)) }
	h := map[string]bool{}
	for _, a := range held {
		h[a] = true
	}
	return policy.Gather(devices, sel, model, h)
}

func choose(t *testing.T, value string, n policy.Node) policy.Choice {
	t.Helper()
	p, err := policy.Parse(value)
	if err != nil {
		t.Fatal(err)
	}
	return policy.Choose(p, n)
}

func gpus(list []string, idx ...int) []string {
	out := []string{}
	for _, i := range idx {
		out = append(out, list[i])
	}
	return out
}

func TestGather(t *testing.T) {
	n := node(t, vfiotest.TwoSocketL40S())
	if len(n.GPUs) != 8 || n.NVSwitches != 0 {
		t.Fatalf("gathered %d GPUs and %d NVSwitches: %+v", len(n.GPUs), n.NVSwitches, n)
	}
	g := n.GPUs[5]
	if g.Address != vfiotest.TwoSocketL40SGPUs[5] || g.Index != 5 || g.Model != "AD102GL_L40S" || g.NUMANode != 1 || g.Switch != "0000:9b:00.0" {
		t.Errorf("GPU 5: %+v", g)
	}
	if n.GPUs[4].Switch != g.Switch || n.GPUs[6].Switch == g.Switch {
		t.Errorf("switches: GPU 4 %q, 5 %q, 6 %q", n.GPUs[4].Switch, g.Switch, n.GPUs[6].Switch)
	}
	if h := node(t, vfiotest.HGXH100()); len(h.GPUs) != 8 || h.NVSwitches != 4 || h.GPUs[0].Switch != "" {
		t.Errorf("HGX: %+v", h)
	}
}

func TestChooseCount(t *testing.T) {
	hgx, l40s := vfiotest.HGXH100GPUs, vfiotest.TwoSocketL40SGPUs
	for _, tc := range []struct {
		name   string
		node   policy.Node
		value  string
		want   []string
		reason []string
	}{
		{"HGX half is one NUMA node", node(t, vfiotest.HGXH100()), "4", gpus(hgx, 0, 1, 2, 3),
			[]string{"NUMA node 0 whole", "NVLink fabric"}},
		{"HGX half follows the VM", node(t, vfiotest.HGXH100(), hgx[5], hgx[6]), "4", gpus(hgx, 4, 5, 6, 7),
			[]string{"NUMA node 1 whole"}},
		{"HGX VMs on both sockets keep their GPUs", node(t, vfiotest.HGXH100(), hgx[1], hgx[6]), "4", gpus(hgx, 0, 1, 2, 6),
			[]string{"whole NUMA nodes would move GPUs that VMs hold"}},
		{"HGX six", node(t, vfiotest.HGXH100()), "6", gpus(hgx, 0, 1, 2, 3, 4, 5),
			[]string{"NUMA node 0 whole and part of NUMA node 1", "no set of whole NUMA nodes has 6 GPUs"}},
		{"L40S pair is one switch", node(t, vfiotest.TwoSocketL40S()), "2", gpus(l40s, 0, 1),
			[]string{"part of NUMA node 0", "PCIe switch"}},
		{"L40S pair next to the VM", node(t, vfiotest.TwoSocketL40S(), l40s[7]), "2", gpus(l40s, 6, 7), nil},
		{"L40S three: a switch and one more", node(t, vfiotest.TwoSocketL40S()), "3", gpus(l40s, 0, 1, 2), nil},
		{"L40S four is a socket", node(t, vfiotest.TwoSocketL40S(), l40s[4]), "4", gpus(l40s, 4, 5, 6, 7),
			[]string{"NUMA node 1 whole"}},
	} {
		c := choose(t, tc.value, tc.node)
		if !slices.Equal(c.VM, tc.want) {
			t.Errorf("%s: chose %v, want %v (%s)", tc.name, c.VM, tc.want, c.Reason)
		}
		for _, r := range tc.reason {
			if !strings.Contains(c.Reason, r) {
				t.Errorf("%s: reason %q does not say %q", tc.name, c.Reason, r)
			}
		}
		if len(c.Warnings) > 0 {
			t.Errorf("%s: warnings %v", tc.name, c.Warnings)
		}
	}
}

// A count that changes keeps what is bound where topology allows: from 4 to
// 6 on the HGX, the four bound GPUs stay and two join them.
func TestChooseCountMovesFewGPUs(t *testing.T) {
	n := node(t, vfiotest.HGXH100())
	for i := range n.GPUs {
		n.GPUs[i].Bound = n.GPUs[i].NUMANode == 1
	}
	c := choose(t, "6", n)
	if want := gpus(vfiotest.HGXH100GPUs, 0, 1, 4, 5, 6, 7); !slices.Equal(c.VM, want) {
		t.Errorf("chose %v, want %v: %s", c.VM, want, c.Reason)
	}
	// Every GPU bound (a node the operator's "all" left) and a count of 4:
	// topology decides among them.
	for i := range n.GPUs {
		n.GPUs[i].Bound = true
	}
	if c := choose(t, "4", n); !slices.Equal(c.VM, gpus(vfiotest.HGXH100GPUs, 0, 1, 2, 3)) || !strings.Contains(c.Reason, "4 of the 8 GPUs already bound") {
		t.Errorf("from all to 4: %v: %s", c.VM, c.Reason)
	}
	// The VM that pinned GPUs 1 and 6 has gone: the node follows the count
	// already, and nothing moves to make NUMA node 0 whole.
	for i := range n.GPUs {
		n.GPUs[i].Bound = i == 0 || i == 1 || i == 2 || i == 6
	}
	if c := choose(t, "4", n); !slices.Equal(c.VM, gpus(vfiotest.HGXH100GPUs, 0, 1, 2, 6)) || !strings.Contains(c.Reason, "moves no GPU it need not") {
		t.Errorf("after the VM: %v: %s", c.VM, c.Reason)
	}
	// Two bound on node 0 and a count of 2: those two.
	for i := range n.GPUs {
		n.GPUs[i].Bound = i == 2 || i == 3
	}
	if c := choose(t, "2", n); !slices.Equal(c.VM, gpus(vfiotest.HGXH100GPUs, 2, 3)) {
		t.Errorf("chose %v: %s", c.VM, c.Reason)
	}
}

func TestChooseEdges(t *testing.T) {
	hgx := vfiotest.HGXH100GPUs
	n := node(t, vfiotest.HGXH100(), hgx[0], hgx[3], hgx[7])
	c := choose(t, "12", n)
	if len(c.VM) != 8 || len(c.Warnings) != 1 || !strings.Contains(c.Warnings[0], "asks for 12 GPUs and the node has 8") {
		t.Errorf("count above the GPUs: %+v", c)
	}
	c = choose(t, "2", n)
	if len(c.VM) != 2 || len(c.Warnings) != 1 || !strings.Contains(c.Warnings[0], "3 GPUs are held") {
		t.Errorf("more held than the count: %+v", c)
	}
	for _, a := range c.VM {
		if !slices.Contains([]string{hgx[0], hgx[3], hgx[7]}, a) {
			t.Errorf("chose free %s while held GPUs go back", a)
		}
	}
	if c := choose(t, "none", n); c.VM == nil || len(c.VM) != 0 {
		t.Errorf("none: %+v", c)
	}
	if c := choose(t, "all", n); len(c.VM) != 8 {
		t.Errorf("all: %+v", c)
	}
}

func TestChooseList(t *testing.T) {
	hgx := vfiotest.HGXH100GPUs
	n := node(t, vfiotest.HGXH100())
	c := choose(t, "gpu0,numa1,"+hgx[2]+",gpu9,0000:05:00.0,0000:77:00.0,GA102GL_A10,numa3", n)
	if want := gpus(hgx, 0, 2, 4, 5, 6, 7); !slices.Equal(c.VM, want) {
		t.Errorf("chose %v, want %v", c.VM, want)
	}
	want := []string{"gpu9: no such GPU: the node has 8 (gpu0 to gpu7)",
		"0000:05:00.0: no GPU at this address", "0000:77:00.0: no GPU at this address",
		"GA102GL_A10: no GPU of this model", "numa3: no GPU on this NUMA node"}
	if len(c.Unmatched) != len(want) {
		t.Fatalf("unmatched %q, want %d", c.Unmatched, len(want))
	}
	for i, w := range want {
		if !strings.HasPrefix(c.Unmatched[i], w) {
			t.Errorf("unmatched[%d] = %q, want %q...", i, c.Unmatched[i], w)
		}
	}
	if c := choose(t, "gh100_h100_sxm5_80gb", n); len(c.VM) != 8 || len(c.Unmatched) != 0 {
		t.Errorf("by model: %+v", c)
	}
}

// GPUs that share an IOMMU group (a switch without ACS) go to VMs
// together: a list or a count naming one of them takes both, and says so.
func TestChooseKeepsSharedGroupsWhole(t *testing.T) {
	l40s := vfiotest.TwoSocketL40SGPUs
	n := node(t, vfiotest.TwoSocketL40SNoACS())
	if g := n.GPUs[1]; g.Group != 80 || n.GPUs[2].Group != 81 {
		t.Fatalf("groups: %+v", n.GPUs)
	}
	for _, tc := range []struct {
		value string
		want  []string
	}{
		{"gpu1", gpus(l40s, 0, 1)},
		{l40s[2] + "," + l40s[4], gpus(l40s, 2, 3, 4, 5)},
		{"1", gpus(l40s, 0, 1)},
		{"3", gpus(l40s, 0, 1, 2, 3)},
		{"2", gpus(l40s, 0, 1)},
	} {
		p, err := policy.Parse(tc.value)
		if err != nil {
			t.Fatal(err)
		}
		c := policy.Choose(p, n)
		if !slices.Equal(c.VM, tc.want) {
			t.Errorf("%s: %v; want %v", tc.value, c.VM, tc.want)
		}
		if len(c.VM) > 2 && tc.value == "2" || tc.value == "gpu1" && !slices.ContainsFunc(c.Warnings, func(w string) bool {
			return strings.Contains(w, l40s[0]+" shares IOMMU group 80 with "+l40s[1])
		}) {
			t.Errorf("%s: warnings %q", tc.value, c.Warnings)
		}
	}
	// On a node where every GPU has its group, nothing is added.
	if c := policy.Choose(policy.Policy{Kind: policy.Count, Count: 1}, node(t, vfiotest.TwoSocketL40S())); len(c.VM) != 1 || len(c.Warnings) != 0 {
		t.Errorf("separate groups: %+v", c)
	}
}
