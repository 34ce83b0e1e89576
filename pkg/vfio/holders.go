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

// Holder is a process that has a device node open: a VMM using a VFIO
// group, a program using a GPU through its host driver, or anything else
// that would keep the kernel from letting the device go.
type Holder struct {
	PID int
	// Command is the process's name (comm), "" when it could not be read.
	Command string
	// Node is the node it holds, as the node names it: /dev/vfio/<group>,
	// /dev/vfio/devices/vfioN, /dev/nvidiaN or /dev/dri/<name>.
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

// nodeSet maps the identities of device nodes to the names they have on
// the node, and to the IOMMU group they belong to.
type nodeSet struct {
	groups map[nodeID]int
	names  map[nodeID]string
}

func newNodeSet() nodeSet { return nodeSet{groups: map[nodeID]int{}, names: map[nodeID]string{}} }

// add records a node by the numbers sysfs gives (what a process in any mount
// namespace opened) and by the file under the dev root (path).
func (s nodeSet) add(group int, name, path string, num CharDev, numErr error) {
	if numErr == nil {
		id := nodeID{rdev: unix.Mkdev(uint32(num.Major), uint32(num.Minor))}
		s.groups[id], s.names[id] = group, name
	}
	var st unix.Stat_t
	if unix.Stat(path, &st) == nil {
		id := idOf(&st)
		s.groups[id], s.names[id] = group, name
	}
}

// addGroupNodes adds every node through which the group can be used: the
// group node and the functions' cdevs.
func (m *Manager) addGroupNodes(s nodeSet, g *Group) {
	if g.ID >= 0 {
		num, err := m.sysfs.GroupCharDev(g.ID)
		s.add(g.ID, fmt.Sprintf("/dev/vfio/%d", g.ID), filepath.Join(m.devRoot, "vfio", strconv.Itoa(g.ID)), num, err)
	}
	for _, mem := range g.Members {
		d, err := m.sysfs.Device(mem.Address)
		if err != nil || d.VFIODevice == "" {
			continue
		}
		num, err := m.sysfs.VFIODeviceCharDev(d.Address, d.VFIODevice)
		s.add(g.ID, "/dev/vfio/devices/"+d.VFIODevice, filepath.Join(m.devRoot, "vfio", "devices", d.VFIODevice), num, err)
	}
}

// nvidiaMajor is the character major of /dev/nvidiaN, fixed by the nvidia
// driver.
const nvidiaMajor = 195

// addHostNodes adds the nodes through which processes use a device on its
// host driver: /dev/nvidiaN, whose minor the nvidia driver gives in
// <proc>/driver/nvidia/gpus/<address>/information, and the DRM nodes
// (/dev/dri/cardN, renderDN) any GPU driver registers in sysfs.
func (m *Manager) addHostNodes(s nodeSet, group int, d *Device) {
	if minor, err := nvidiaMinor(m.procRoot, d.Address); err == nil {
		name := fmt.Sprintf("nvidia%d", minor)
		s.add(group, "/dev/"+name, filepath.Join(m.devRoot, name), CharDev{Major: nvidiaMajor, Minor: minor}, nil)
	}
	drm := filepath.Join(m.sysfs.DevicePath(d.Address), "drm")
	entries, _ := os.ReadDir(drm)
	for _, e := range entries {
		num, err := readCharDev(filepath.Join(drm, e.Name()))
		if err != nil {
			continue // not a node: a connector such as card0-DP-1
		}
		s.add(group, "/dev/dri/"+e.Name(), filepath.Join(m.devRoot, "dri", e.Name()), num, nil)
	}
}

// nvidiaMinor reads the minor of the device's /dev/nvidiaN from the nvidia
// driver's "Device Minor:" line, as nvidia-container-toolkit does.
func nvidiaMinor(procRoot, address string) (int64, error) {
	b, err := os.ReadFile(filepath.Join(procRoot, "driver", "nvidia", "gpus", address, "information"))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "Device Minor:"); ok {
			return strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, fmt.Errorf("%s: no Device Minor in the nvidia driver's information", address)
}

// Holders lists, per IOMMU group of the plan, the processes that hold one of
// its VFIO nodes open, from /proc/<pid>/fd under the proc root. Processes
// that end or cannot be read while the scan runs are passed over; a proc
// root that cannot be listed is an error, since then nobody can say the
// devices are free.
func (m *Manager) Holders(p *Plan) (map[int][]Holder, error) {
	s := newNodeSet()
	for _, g := range p.Groups {
		m.addGroupNodes(s, g)
	}
	return m.scanHolders(s)
}

// HostHolders lists, per IOMMU group of the plan, the processes that hold
// a member that is still on its host driver open through that driver's
// nodes: nvidia-persistenced, DCGM, NVML in a device plugin, a container.
// The driver cannot let such a device go: nvidia's remove waits until every
// handle is closed, which would leave the unbind hanging. Processes are
// read as Holders reads them.
func (m *Manager) HostHolders(p *Plan) (map[int][]Holder, error) {
	s := newNodeSet()
	for _, g := range p.Groups {
		for _, mem := range g.Members {
			if mem.Driver != "" && !mem.BoundToVFIO() {
				m.addHostNodes(s, g.ID, mem.Device)
			}
		}
	}
	return m.scanHolders(s)
}

// scanHolders finds the processes that hold a node of the set open.
func (m *Manager) scanHolders(s nodeSet) (map[int][]Holder, error) {
	out := map[int][]Holder{}
	if len(s.groups) == 0 {
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
			group, ok := s.groups[id]
			if !ok || seen[group] {
				continue
			}
			seen[group] = true
			comm, _ := os.ReadFile(filepath.Join(m.procRoot, e.Name(), "comm"))
			out[group] = append(out[group], Holder{PID: pid, Command: strings.TrimSpace(string(comm)), Node: s.names[id]})
		}
	}
	for _, hs := range out {
		slices.SortFunc(hs, func(a, b Holder) int { return a.PID - b.PID })
	}
	return out, nil
}
