package vfio

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultProcRoot is where the processes whose open files are checked are
// listed: the host's when the agent runs in the host's PID namespace.
const DefaultProcRoot = "/proc"

// Holder is a process that has a VFIO device node open: a VMM using the
// device, or anything else that would keep the kernel from letting it go.
type Holder struct {
	PID int
	// Command is the process's name (comm), "" when it could not be read.
	Command string
	// Node is the node it holds, as the node names it: /dev/vfio/<group> or
	// /dev/vfio/devices/vfioN.
	Node string
}

func (h Holder) String() string {
	return fmt.Sprintf("pid %d (%s) holds %s", h.PID, h.Command, h.Node)
}

// nodeID identifies an open file: a character device by its number, any
// other file (the regular files a fake tree uses) by device and inode.
type nodeID struct {
	rdev     uint64
	dev, ino uint64
}

func idOf(st *unix.Stat_t) nodeID {
	if st.Mode&unix.S_IFMT == unix.S_IFCHR {
		return nodeID{rdev: st.Rdev}
	}
	return nodeID{dev: st.Dev, ino: st.Ino}
}

// groupNodes returns the identities of every node through which the group
// can be used, mapped to the name the node has on the node: the group node
// and the functions' cdevs, by the numbers sysfs gives (what a process in any
// mount namespace opened) and by the files under the dev root.
func (m *Manager) groupNodes(g *Group) map[nodeID]string {
	ids := map[nodeID]string{}
	add := func(name, path string, num CharDev, numErr error) {
		if numErr == nil {
			ids[nodeID{rdev: unix.Mkdev(uint32(num.Major), uint32(num.Minor))}] = name
		}
		var st unix.Stat_t
		if unix.Stat(path, &st) == nil {
			ids[idOf(&st)] = name
		}
	}
	if g.ID >= 0 {
		num, err := m.sysfs.GroupCharDev(g.ID)
		add(fmt.Sprintf("/dev/vfio/%d", g.ID), filepath.Join(m.devRoot, "vfio", strconv.Itoa(g.ID)), num, err)
	}
	for _, mem := range g.Members {
		d, err := m.sysfs.Device(mem.Address)
		if err != nil || d.VFIODevice == "" {
			continue
		}
		num, err := m.sysfs.VFIODeviceCharDev(d.Address, d.VFIODevice)
		add("/dev/vfio/devices/"+d.VFIODevice, filepath.Join(m.devRoot, "vfio", "devices", d.VFIODevice), num, err)
	}
	return ids
}

// Holders lists, per IOMMU group of the plan, the processes that hold one of
// its VFIO nodes open, from /proc/<pid>/fd under the proc root. Processes
// that end or cannot be read while the scan runs are passed over; a proc
// root that cannot be listed is an error, since then nobody can say the
// devices are free.
func (m *Manager) Holders(p *Plan) (map[int][]Holder, error) {
	want := map[nodeID]int{} // node → group ID
	names := map[nodeID]string{}
	for _, g := range p.Groups {
		for id, name := range m.groupNodes(g) {
			want[id], names[id] = g.ID, name
		}
	}
	out := map[int][]Holder{}
	if len(want) == 0 {
		return out, nil
	}
	entries, err := os.ReadDir(m.procRoot)
	if err != nil {
		return nil, fmt.Errorf("list processes in %q: %w", m.procRoot, err)
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		fdDir := filepath.Join(m.procRoot, e.Name(), "fd")
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			continue // gone, or a kernel thread
		}
		seen := map[int]bool{}
		for _, fd := range fds {
			p := filepath.Join(fdDir, fd.Name())
			target, err := os.Readlink(p)
			if err != nil || !strings.HasPrefix(target, "/") {
				continue // sockets, pipes and anonymous inodes name no path
			}
			var st unix.Stat_t
			if unix.Stat(p, &st) != nil {
				continue
			}
			id := idOf(&st)
			group, ok := want[id]
			if !ok || seen[group] {
				continue
			}
			seen[group] = true
			comm, _ := os.ReadFile(filepath.Join(m.procRoot, e.Name(), "comm"))
			out[group] = append(out[group], Holder{PID: pid, Command: strings.TrimSpace(string(comm)), Node: names[id]})
		}
	}
	for _, hs := range out {
		slices.SortFunc(hs, func(a, b Holder) int { return a.PID - b.PID })
	}
	return out, nil
}
