package sandboxplugin

import (
	"slices"
	"testing"
)

func TestPreferred(t *testing.T) {
	// Two NUMA nodes: node 0 has four GPUs under two switches, node 1 three.
	devices := map[string]*device{}
	add := func(id string, numa int, path string) { devices[id] = &device{ID: id, NUMA: numa, Path: path} }
	add("a0", 0, "/sys/devices/pci0000:00/sw0/a0")
	add("a1", 0, "/sys/devices/pci0000:00/sw0/a1")
	add("b0", 0, "/sys/devices/pci0000:00/sw1/b0")
	add("b1", 0, "/sys/devices/pci0000:00/sw1/b1")
	add("c0", 1, "/sys/devices/pci0000:80/sw2/c0")
	add("c1", 1, "/sys/devices/pci0000:80/sw2/c1")
	add("c2", 1, "/sys/devices/pci0000:80/sw3/c2")
	all := []string{"a0", "a1", "b0", "b1", "c0", "c1", "c2"}

	for _, tc := range []struct {
		name      string
		available []string
		must      []string
		size      int
		want      []string
	}{
		{"two fit the smaller node", all, nil, 2, []string{"c0", "c1"}},
		{"three fit node 1 exactly", all, nil, 3, []string{"c0", "c1", "c2"}},
		{"four need node 0", all, nil, 4, []string{"a0", "a1", "b0", "b1"}},
		{"must-include pins the node and the switch", all, []string{"b1"}, 2, []string{"b1", "b0"}},
		{"must-include on node 1", all, []string{"c2"}, 3, []string{"c2", "c0", "c1"}},
		{"more than a node spills over", all, nil, 5, []string{"a0", "a1", "b0", "b1", "c0"}},
		{"only what is available", []string{"a0", "c0", "c1"}, nil, 2, []string{"c0", "c1"}},
		{"must-include alone", all, []string{"a1", "c0"}, 2, []string{"a1", "c0"}},
		{"one switch without must-include", []string{"a0", "b0", "b1"}, nil, 2, []string{"b0", "b1"}},
		{"the switch that fits tightest", []string{"a0", "a1", "b0", "b1", "c0"}, nil, 1, []string{"c0"}},
		{"a lone device on a switch fits one", []string{"a0", "a1", "b1"}, nil, 1, []string{"b1"}},
		{"then the nearest to the chosen", []string{"a0", "b0", "b1", "a1"}, nil, 3, []string{"a0", "a1", "b0"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := preferred(devices, tc.available, tc.must, tc.size)
			if !slices.Equal(got, tc.want) {
				t.Errorf("preferred(%v, must %v, %d) = %v, want %v", tc.available, tc.must, tc.size, got, tc.want)
			}
		})
	}
}
