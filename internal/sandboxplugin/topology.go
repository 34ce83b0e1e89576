package sandboxplugin

import (
	"maps"
	"slices"
	"strings"
)

// preferred picks size devices from available: every one of mustInclude,
// then, where it can, devices of one NUMA node, nearest first on the PCIe
// tree. A node that can hold the whole request alone is preferred, the one
// with the fewest free devices first, so that big requests keep finding
// whole nodes.
func preferred(devices map[string]*device, available, mustInclude []string, size int) []string {
	chosen := []string{}
	taken := map[string]bool{}
	for _, id := range mustInclude {
		if !taken[id] {
			chosen, taken[id] = append(chosen, id), true
		}
	}
	var free []string
	for _, id := range available {
		if !taken[id] && devices[id] != nil {
			free = append(free, id)
		}
	}
	need := size - len(chosen)
	if need <= 0 {
		return chosen[:size]
	}

	perNode := map[int]int{}
	for _, id := range free {
		perNode[devices[id].NUMA]++
	}
	target := -2 // no NUMA node chosen
	if len(chosen) > 0 && devices[chosen[0]] != nil {
		target = devices[chosen[0]].NUMA
	} else {
		nodes := slices.Sorted(maps.Keys(perNode))
		for _, node := range nodes { // the smallest node that fits the request
			if n := perNode[node]; n >= need && (target == -2 || n < perNode[target]) {
				target = node
			}
		}
		if target == -2 {
			for _, node := range nodes { // else the largest
				if target == -2 || perNode[node] > perNode[target] {
					target = node
				}
			}
		}
	}

	anchor := ""
	if len(chosen) > 0 && devices[chosen[0]] != nil {
		anchor = devices[chosen[0]].Path
	}
	slices.SortStableFunc(free, func(a, b string) int {
		da, db := devices[a], devices[b]
		if (da.NUMA == target) != (db.NUMA == target) {
			if da.NUMA == target {
				return -1
			}
			return 1
		}
		if anchor != "" {
			if ca, cb := commonPrefix(anchor, da.Path), commonPrefix(anchor, db.Path); ca != cb {
				return cb - ca
			}
		}
		return strings.Compare(da.Path, db.Path)
	})
	for _, id := range free {
		if len(chosen) == size {
			break
		}
		chosen = append(chosen, id)
		if anchor == "" {
			anchor = devices[id].Path
		}
	}
	return chosen
}

// commonPrefix counts the path elements two sysfs paths share: devices under
// the same switch share more of their path.
func commonPrefix(a, b string) int {
	as, bs := strings.Split(a, "/"), strings.Split(b, "/")
	n := 0
	for n < len(as) && n < len(bs) && as[n] == bs[n] {
		n++
	}
	return n
}
