package sandboxplugin

import (
	"cmp"
	"maps"
	"path/filepath"
	"slices"
	"strings"
)

// preferred picks size devices from available: every one of mustInclude,
// then, where it can, devices of one NUMA node, then of one PCIe switch,
// then the nearest on the PCIe tree to those already chosen. A node (and,
// within it, a switch) that can hold the whole request alone is preferred,
// the one with the fewest free devices first, so that big requests keep
// finding whole nodes and switches; failing that, the largest.
//
// NVLink needs no rule of its own: on boards with NVSwitches every GPU of
// the board is in one NVLink domain, and PCIe cards paired by NVLink
// bridges sit next to each other, behind one switch.
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
	if len(chosen) >= size {
		return chosen[:size]
	}
	need := size - len(chosen)

	target := -2 // no NUMA node chosen
	if len(chosen) > 0 && devices[chosen[0]] != nil {
		target = devices[chosen[0]].NUMA
	} else {
		target = tightest(free, need, func(id string) int { return devices[id].NUMA })
	}
	if len(chosen) == 0 && len(free) > 0 {
		// The switch of the target node that holds the request most
		// tightly gives the first device.
		var local []string
		for _, id := range free {
			if devices[id].NUMA == target {
				local = append(local, id)
			}
		}
		parent := func(id string) string { return filepath.Dir(devices[id].Path) }
		sw := tightest(local, need, parent)
		for _, id := range slices.SortedFunc(slices.Values(local), func(a, b string) int { return strings.Compare(devices[a].Path, devices[b].Path) }) {
			if parent(id) == sw {
				chosen, taken[id] = append(chosen, id), true
				break
			}
		}
	}
	// Then, one by one: the target node first, nearest to what is chosen.
	for len(chosen) < size {
		best, bestNear := "", -1
		for _, id := range free {
			if taken[id] {
				continue
			}
			d := devices[id]
			near := 0
			for _, c := range chosen {
				if cd := devices[c]; cd != nil {
					near = max(near, commonPrefix(cd.Path, d.Path))
				}
			}
			if best == "" {
				best, bestNear = id, near
				continue
			}
			b := devices[best]
			if (d.NUMA == target) != (b.NUMA == target) {
				if d.NUMA == target {
					best, bestNear = id, near
				}
				continue
			}
			if near > bestNear || near == bestNear && d.Path < b.Path {
				best, bestNear = id, near
			}
		}
		if best == "" {
			break
		}
		chosen, taken[best] = append(chosen, best), true
	}
	return chosen
}

// tightest groups ids by key and returns the key of the smallest group
// that holds need, else of the largest; ties go to the smaller key.
func tightest[K cmp.Ordered](ids []string, need int, key func(string) K) K {
	count := map[K]int{}
	for _, id := range ids {
		count[key(id)]++
	}
	var best K
	first := true
	fits := func(k K) bool { return count[k] >= need }
	for _, k := range slices.Sorted(maps.Keys(count)) {
		switch {
		case first:
			best, first = k, false
		case fits(k) && (!fits(best) || count[k] < count[best]):
			best = k
		case !fits(k) && !fits(best) && count[k] > count[best]:
			best = k
		}
	}
	return best
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
