package policy

import (
	"cmp"
	"fmt"
	"slices"
	"strings"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
)

// GPU is one GPU a policy can choose, as the node shows it now.
type GPU struct {
	Address string
	// Index is the GPU's place among the node's GPUs in PCI address order,
	// the number nvidia-smi gives it.
	Index int
	// Model is the name part of its resource ("GA102GL_A10").
	Model string
	// NUMANode is -1 when sysfs says none.
	NUMANode int
	// Switch names the PCIe switch the GPU sits behind (the upstream port
	// of its bridge), "" when it sits on a root port.
	Switch string
	// Group is the GPU's IOMMU group, -1 for none. GPUs that share one
	// (behind a switch without ACS) go to VMs together or not at all.
	Group int
	// Bound is true when a vfio driver holds the GPU now, Held when a
	// process (a VM) holds its group open.
	Bound, Held bool
}

// Node describes the GPUs a policy chooses among.
type Node struct {
	GPUs []GPU // in address order
	// NVSwitches is the number of NVSwitches: with them, every GPU of the
	// node is on one NVLink fabric.
	NVSwitches int
}

// Gather describes the GPUs among devices that sel selects (role GPU), in
// address order. model names a GPU's model; held tells the GPUs whose group a
// process holds, by address.
func Gather(devices []*vfio.Device, sel vfio.Selector, model func(*vfio.Device) string, held map[string]bool) Node {
	byAddr := map[string]*vfio.Device{}
	for _, d := range devices {
		byAddr[d.Address] = d
	}
	var n Node
	for _, d := range devices {
		role, ok := sel.Match(d)
		switch {
		case d.IsNVSwitch():
			n.NVSwitches++
		case ok && role == vfio.RoleGPU:
			g := GPU{Address: d.Address, Index: len(n.GPUs), Model: model(d), NUMANode: d.NUMANode,
				Group: d.IOMMUGroup, Bound: d.BoundToVFIO(), Held: held[d.Address]}
			// The GPU's bridge is a switch's downstream port; the switch is
			// the port above it. A GPU straight on a root port has none.
			if port := byAddr[d.Parent]; port != nil && port.Parent != "" {
				g.Switch = port.Parent
			}
			n.GPUs = append(n.GPUs, g)
		}
	}
	return n
}

// Choice is what a policy means on a node.
type Choice struct {
	// VM lists the addresses of the GPUs for VMs, in address order.
	VM []string
	// Reason says why these, in a sentence.
	Reason string
	// Unmatched lists the items of a List policy that name no GPU of the
	// node, each with the reason; the other items still apply.
	Unmatched []string
	// Warnings are things an administrator should know: a count larger
	// than the GPUs, GPUs held beyond the count.
	Warnings []string
}

// Choose applies the policy to the node. A GPU that shares its IOMMU
// group with a chosen one is chosen too, with a warning: VFIO takes groups
// whole.
//
// A count moves as few GPUs as it can (a node that already has that many
// bound keeps them), never leaves out a GPU a VM holds while it takes a free
// one, and within that takes whole NUMA nodes where some set of them has
// that many GPUs, so that a VM's GPUs share the memory and the PCIe root
// they are near; else it fills NUMA nodes in turn, whole PCIe switches
// first.
func Choose(p Policy, n Node) Choice {
	all := make([]string, len(n.GPUs))
	for i, g := range n.GPUs {
		all[i] = g.Address
	}
	switch p.Kind {
	case All:
		return Choice{VM: all, Reason: fmt.Sprintf("all %d GPUs", len(all))}
	case None:
		return Choice{VM: []string{}, Reason: "no GPU"}
	case List:
		return wholeGroups(chooseList(p.Items, n), n)
	}
	if p.Count >= len(n.GPUs) {
		c := Choice{VM: all, Reason: fmt.Sprintf("all %d GPUs", len(all))}
		if p.Count > len(n.GPUs) {
			c.Warnings = append(c.Warnings, fmt.Sprintf("the policy asks for %d GPUs and the node has %d: all of them", p.Count, len(n.GPUs)))
		}
		return c
	}
	return wholeGroups(chooseCount(p.Count, n), n)
}

// wholeGroups adds to the choice every GPU that shares an IOMMU group with
// a chosen one, saying so.
func wholeGroups(c Choice, n Node) Choice {
	chosen := map[string]bool{}
	groups := map[int]string{} // group → a chosen GPU of it
	for _, a := range c.VM {
		chosen[a] = true
	}
	for _, g := range n.GPUs {
		if chosen[g.Address] && g.Group >= 0 {
			if _, ok := groups[g.Group]; !ok {
				groups[g.Group] = g.Address
			}
		}
	}
	for _, g := range n.GPUs {
		if first, ok := groups[g.Group]; ok && g.Group >= 0 && !chosen[g.Address] {
			c.VM = append(c.VM, g.Address)
			c.Warnings = append(c.Warnings, fmt.Sprintf("%s shares IOMMU group %d with %s: VFIO gives a group whole, so it is for VMs too", g.Address, g.Group, first))
		}
	}
	slices.Sort(c.VM)
	return c
}

func chooseList(items []Item, n Node) Choice {
	chosen := map[string]bool{}
	var c Choice
	for _, it := range items {
		found := 0
		for _, g := range n.GPUs {
			var match bool
			switch it.Kind {
			case ByIndex:
				match = g.Index == it.Index
			case ByAddress:
				match = g.Address == it.Value
			case ByNUMA:
				match = g.NUMANode == it.Index
			case ByModel:
				match = strings.EqualFold(g.Model, it.Value)
			}
			if match {
				chosen[g.Address] = true
				found++
			}
		}
		if found == 0 {
			c.Unmatched = append(c.Unmatched, fmt.Sprintf("%s: %s", it.Text, unmatched(it, n)))
		}
	}
	c.VM = []string{}
	for _, g := range n.GPUs {
		if chosen[g.Address] {
			c.VM = append(c.VM, g.Address)
		}
	}
	c.Reason = fmt.Sprintf("%d of %d GPUs, as listed", len(c.VM), len(n.GPUs))
	return c
}

func unmatched(it Item, n Node) string {
	switch it.Kind {
	case ByIndex:
		return fmt.Sprintf("no such GPU: the node has %d (gpu0 to gpu%d)", len(n.GPUs), len(n.GPUs)-1)
	case ByAddress:
		return "no GPU at this address (no device, or one that is no selected GPU)"
	case ByNUMA:
		return "no GPU on this NUMA node"
	}
	return "no GPU of this model"
}

// chooseCount picks k GPUs, 0 < k < len(n.GPUs).
//
// It moves as few GPUs as it can: with k or more bound it chooses among the
// bound ones, with fewer it keeps them all and adds to them. Within that,
// held GPUs are always kept (up to k), then whole NUMA nodes are preferred,
// then whole PCIe switches. So a node that already follows a count is left
// alone even when a VM that pinned its choice has gone.
func chooseCount(k int, n Node) Choice {
	var c Choice
	var held, bound []GPU
	for _, g := range n.GPUs {
		if g.Held {
			held = append(held, g)
		}
		if g.Bound || g.Held {
			bound = append(bound, g)
		}
	}
	if len(held) > k {
		c.Warnings = append(c.Warnings, fmt.Sprintf("%d GPUs are held by VMs and the policy asks for %d: the others go back when their VMs let go", len(held), k))
	}
	must, may := map[string]bool{}, map[string]bool{}
	for _, g := range held[:min(len(held), k)] {
		must[g.Address] = true
	}
	for _, g := range n.GPUs {
		may[g.Address] = len(bound) < k || g.Bound || g.Held
		if len(bound) <= k && (g.Bound || g.Held) {
			must[g.Address] = true
		}
	}
	kept := ""
	switch {
	case len(bound) == k:
		kept = fmt.Sprintf("; the %d GPUs already bound, as a count moves no GPU it need not", k)
	case len(bound) > k:
		kept = fmt.Sprintf("; %d of the %d GPUs already bound", k, len(bound))
	case len(bound) > 0:
		kept = fmt.Sprintf("; the %d GPUs already bound and %d more", len(bound), k-len(bound))
	}

	numas := numaNodes(n.GPUs)
	if set, ok := wholeNUMA(k, numas, n.GPUs, must, may); ok {
		c.VM = addresses(n.GPUs, set)
		c.Reason = fmt.Sprintf("%d of %d GPUs: NUMA node %s whole", k, len(n.GPUs), joinInts(set))
	} else {
		c.VM, c.Reason = fill(k, numas, n.GPUs, must, may)
	}
	c.Reason += kept
	if n.NVSwitches > 0 {
		c.Reason += fmt.Sprintf("; the %d NVSwitches join all %d GPUs in one NVLink fabric, which a count below %d splits: VMs get no NVLink between their GPUs unless the host's fabric manager partitions it",
			n.NVSwitches, len(n.GPUs), len(n.GPUs))
	}
	return c
}

// numaNodes lists the NUMA nodes that have GPUs, in order.
func numaNodes(gpus []GPU) []int {
	var ids []int
	for _, g := range gpus {
		ids = append(ids, g.NUMANode)
	}
	slices.Sort(ids)
	return slices.Compact(ids)
}

// wholeNUMA finds the set of whole NUMA nodes, lowest numbers first, whose
// GPUs number k, include every GPU in must and only GPUs in may.
func wholeNUMA(k int, numas []int, gpus []GPU, must, may map[string]bool) ([]int, bool) {
	if len(numas) > 16 {
		return nil, false
	}
	var best []int
	for mask := 1; mask < 1<<len(numas); mask++ {
		var set []int
		for i, id := range numas {
			if mask&(1<<i) != 0 {
				set = append(set, id)
			}
		}
		size, ok := 0, true
		for _, g := range gpus {
			in := slices.Contains(set, g.NUMANode)
			if in {
				size++
			}
			if in && !may[g.Address] || !in && must[g.Address] {
				ok = false
			}
		}
		if ok && size == k && (best == nil || slices.Compare(set, best) < 0) {
			best = set
		}
	}
	return best, best != nil
}

// fill takes the GPUs in must, then more from may NUMA node by NUMA node
// (nodes with held, then bound GPUs first, then larger ones), whole PCIe
// switches first within a node, until it has k.
func fill(k int, numas []int, gpus []GPU, must, may map[string]bool) ([]string, string) {
	chosen := map[string]bool{}
	count := 0
	take := func(g GPU) {
		if count < k && !chosen[g.Address] && may[g.Address] {
			chosen[g.Address] = true
			count++
		}
	}
	for _, g := range gpus {
		if must[g.Address] {
			take(g)
		}
	}
	type numaInfo struct{ id, held, bound, size int }
	infos := make([]numaInfo, 0, len(numas))
	for _, id := range numas {
		in := numaInfo{id: id}
		for _, g := range gpus {
			if g.NUMANode == id {
				in.size++
				in.held += btoi(g.Held)
				in.bound += btoi(g.Bound)
			}
		}
		infos = append(infos, in)
	}
	slices.SortStableFunc(infos, func(a, b numaInfo) int {
		return cmp.Or(b.held-a.held, b.bound-a.bound, b.size-a.size, a.id-b.id)
	})
	var whole, partial []int
	for _, in := range infos {
		var node []GPU
		for _, g := range gpus {
			if g.NUMANode == in.id && may[g.Address] {
				node = append(node, g)
			}
		}
		units := switchUnits(node)
		for _, unit := range units {
			if count+len(unit) <= k {
				for _, g := range unit {
					take(g)
				}
			}
		}
		for _, unit := range units { // what whole switches could not fill
			for _, g := range unit {
				take(g)
			}
		}
		taken, size := 0, 0
		for _, g := range gpus {
			if g.NUMANode == in.id {
				size++
				taken += btoi(chosen[g.Address])
			}
		}
		switch {
		case taken == size:
			whole = append(whole, in.id)
		case taken > 0:
			partial = append(partial, in.id)
		}
	}
	var out []string
	for _, g := range gpus {
		if chosen[g.Address] {
			out = append(out, g.Address)
		}
	}
	var parts []string
	if len(whole) > 0 {
		slices.Sort(whole)
		parts = append(parts, "NUMA node "+joinInts(whole)+" whole")
	}
	if len(partial) > 0 {
		slices.Sort(partial)
		parts = append(parts, "part of NUMA node "+joinInts(partial))
	}
	why := fmt.Sprintf("no set of whole NUMA nodes has %d GPUs", k)
	if _, ok := wholeNUMA(k, numas, gpus, map[string]bool{}, allOf(gpus)); ok {
		why = "whole NUMA nodes would move GPUs that VMs hold or that need not move"
	}
	reason := fmt.Sprintf("%d of %d GPUs: %s (%s; GPUs behind one PCIe switch kept together)", k, len(gpus), strings.Join(parts, " and "), why)
	return out, reason
}

// switchUnits splits a NUMA node's GPUs into the groups behind one PCIe
// switch (a GPU on a root port alone), held and bound units first, then
// larger, then in address order; within a unit, held and bound GPUs first.
func switchUnits(gpus []GPU) [][]GPU {
	var units [][]GPU
	index := map[string]int{}
	for _, g := range gpus {
		key := g.Switch
		if key == "" {
			key = "root:" + g.Address
		}
		i, ok := index[key]
		if !ok {
			i = len(units)
			index[key] = i
			units = append(units, nil)
		}
		units[i] = append(units[i], g)
	}
	rank := func(u []GPU) (held, bound int) {
		for _, g := range u {
			held += btoi(g.Held)
			bound += btoi(g.Bound)
		}
		return
	}
	for _, u := range units {
		slices.SortStableFunc(u, func(a, b GPU) int { return cmp.Or(btoi(b.Held)-btoi(a.Held), btoi(b.Bound)-btoi(a.Bound)) })
	}
	slices.SortStableFunc(units, func(a, b []GPU) int {
		ha, ba := rank(a)
		hb, bb := rank(b)
		return cmp.Or(hb-ha, bb-ba, len(b)-len(a), strings.Compare(a[0].Address, b[0].Address))
	})
	return units
}

func allOf(gpus []GPU) map[string]bool {
	all := map[string]bool{}
	for _, g := range gpus {
		all[g.Address] = true
	}
	return all
}

func addresses(gpus []GPU, numas []int) []string {
	out := []string{}
	for _, g := range gpus {
		if slices.Contains(numas, g.NUMANode) {
			out = append(out, g.Address)
		}
	}
	return out
}

func joinInts(ids []int) string {
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = fmt.Sprint(id)
	}
	if len(s) > 1 {
		return strings.Join(s[:len(s)-1], ", ") + " and " + s[len(s)-1]
	}
	return s[0]
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
