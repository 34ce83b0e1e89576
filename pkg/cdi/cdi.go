package cdi

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"

	"go.yaml.in/yaml/v3"
	"golang.org/x/sys/unix"
	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"
	"tags.cncf.io/container-device-interface/pkg/parser"
	specs "tags.cncf.io/container-device-interface/specs-go"

	"github.com/gpu-sandbox/gpu-sandbox/internal/atomicfile"
	"github.com/gpu-sandbox/gpu-sandbox/internal/faultinject"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
)

// Defaults.
const (
	// DefaultRoot is where container runtimes read dynamic CDI specs.
	DefaultRoot = "/var/run/cdi"
	// Vendor of every kind this package writes.
	Vendor = "nvidia.com"
	// PassthroughKind names every passthrough GPU of the node, by index and
	// by address.
	PassthroughKind = Vendor + "/pgpu"
)

// ErrNoDevices means a spec was asked for without devices; the CDI
// specification does not allow an empty one.
var ErrNoDevices = errors.New("no devices")

// NodeOptions say how a spec's device nodes are written. The zero value
// gives legacy-mode nodes without device numbers.
type NodeOptions struct {
	// Mode selects the device nodes. Zero: vfio.ModeLegacy.
	Mode vfio.Mode
	// Sysfs is read for the nodes' device numbers. Nil: paths only, and the
	// runtime stats the nodes.
	Sysfs *vfio.Sysfs
}

// SpecOptions tune NewSpec. The zero value gives a legacy-mode spec naming
// devices by address, without device numbers.
type SpecOptions struct {
	NodeOptions
	// ByIndex also names the devices 0, 1, ... in address order.
	ByIndex bool
	// ByGroup also names each device by its IOMMU group number and by the
	// vfioN cdev of each of its functions: the IDs NVIDIA's sandbox device
	// plugin gives, so that containers of pods created before it was
	// replaced still resolve. A name an index already has is left out:
	// the index wins.
	ByGroup bool
}

// QualifiedName is the CDI name of a device: kind=name.
func QualifiedName(kind, name string) string { return kind + "=" + name }

// NewSpec builds the spec of kind for devices, sorted by ID. Each device is
// named by its ID (and its index with ByIndex), and by the address of each
// other function of its group, which VFIO can only give with it. A device
// whose group carries several selected devices (Shared) is annotated with
// how many, and which.
func NewSpec(kind string, devices []*vfio.Passthrough, opts SpecOptions) (*specs.Spec, error) {
	if len(devices) == 0 {
		return nil, fmt.Errorf("CDI spec %s: %w", kind, ErrNoDevices)
	}
	mode := opts.Mode
	if mode == "" {
		mode = vfio.ModeLegacy
	}
	spec := &specs.Spec{Kind: kind}
	sorted := sortedByID(devices)
	named := make([]specs.Device, 0, 2*len(sorted))
	for i, p := range sorted {
		paths, err := p.DevicePaths(mode)
		if err != nil {
			return nil, fmt.Errorf("CDI spec %s: %w", kind, err)
		}
		edits := specs.ContainerEdits{}
		for j, path := range paths {
			var num vfio.CharDev
			if opts.Sysfs != nil {
				if mode == vfio.ModeIOMMUFD {
					num, err = opts.Sysfs.VFIODeviceCharDev(p.Functions[j].Address, p.Functions[j].VFIODevice)
				} else {
					num, err = opts.Sysfs.GroupCharDev(p.IOMMUGroup)
				}
			}
			edits.DeviceNodes = append(edits.DeviceNodes, node(path, num, err))
		}
		var ann map[string]string
		if p.Shared() {
			ann = sharedAnnotations(p)
		}
		if opts.ByIndex {
			spec.Devices = append(spec.Devices, specs.Device{Name: strconv.Itoa(i), Annotations: ann, ContainerEdits: edits})
		}
		named = append(named, specs.Device{Name: p.ID, Annotations: ann, ContainerEdits: edits})
		// Every other function of the group resolves to the group's
		// device: the address of the second GPU of a shared group, or of
		// a GPU's audio function, names what VFIO can give.
		for _, f := range p.Functions {
			if f.Address != p.ID {
				named = append(named, specs.Device{Name: f.Address, Annotations: ann, ContainerEdits: edits})
			}
		}
	}
	spec.Devices = append(spec.Devices, named...)
	if opts.ByGroup {
		taken := map[string]bool{}
		for _, d := range spec.Devices {
			taken[d.Name] = true
		}
		byName := map[string]specs.Device{}
		for _, d := range named {
			byName[d.Name] = d
		}
		for _, p := range sorted {
			legacy := []string{strconv.Itoa(p.IOMMUGroup)}
			for _, f := range p.Functions {
				if f.VFIODevice != "" {
					legacy = append(legacy, f.VFIODevice)
				}
			}
			for _, name := range legacy {
				if !taken[name] && p.IOMMUGroup >= 0 {
					d := byName[p.ID]
					d.Name = name
					spec.Devices = append(spec.Devices, d)
					taken[name] = true
				}
			}
		}
	}

	common := vfio.CommonDevicePath(mode)
	var num vfio.CharDev
	var err error
	if opts.Sysfs != nil {
		num, err = opts.Sysfs.MiscCharDev(filepath.Base(common))
	}
	spec.ContainerEdits.DeviceNodes = []*specs.DeviceNode{node(common, num, err)}

	v, err := specs.MinimumRequiredVersion(spec)
	if err != nil {
		return nil, fmt.Errorf("CDI spec %s: %w", kind, err)
	}
	spec.Version = v
	return spec, nil
}

// Annotations of the devices of a shared group (CDI 0.6.0 and later):
// how many selected devices the group carries, and which.
const (
	AnnotationGroupDevices = "gpu-sandbox.io/iommu-group-devices"
	AnnotationGroupCount   = "gpu-sandbox.io/iommu-group-device-count"
)

func sharedAnnotations(p *vfio.Passthrough) map[string]string {
	addrs := make([]string, len(p.Selected))
	for i, d := range p.Selected {
		addrs[i] = d.Address
	}
	return map[string]string{
		AnnotationGroupCount:   strconv.Itoa(len(p.Selected)),
		AnnotationGroupDevices: strings.Join(addrs, ","),
	}
}

// node describes a device node; its numbers are left to the runtime when
// sysfs could not tell them.
func node(path string, num vfio.CharDev, err error) *specs.DeviceNode {
	n := &specs.DeviceNode{Path: path}
	if err == nil && num.Major > 0 {
		n.Type, n.Major, n.Minor = "c", num.Major, num.Minor
	}
	return n
}

func sortedByID(devices []*vfio.Passthrough) []*vfio.Passthrough {
	out := slices.Clone(devices)
	slices.SortFunc(out, func(a, b *vfio.Passthrough) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// Writer writes specs into a CDI spec directory through the CDI library's
// cache, which validates every spec it writes. It is safe for concurrent
// use.
type Writer struct {
	root  string
	cache *cdiapi.Cache

	mu sync.Mutex
	// on records, per file, the last spec known to be on disk and the
	// file's identity then, so that an unchanged spec over an untouched
	// file is not encoded again.
	on map[string]written
}

// written is a spec known to be in a file, and the file's identity then.
type written struct {
	spec *specs.Spec
	file fileID
}

// fileID tells a file from another one or from itself changed: a rename
// over it gives a new inode, an edit in place a new size or times (the
// change time, which no one can set back, with the modification time).
type fileID struct {
	dev, ino     uint64
	size         int64
	mtime, ctime int64 // ns
}

func idOf(st *unix.Stat_t) fileID {
	return fileID{dev: st.Dev, ino: st.Ino, size: st.Size, mtime: st.Mtim.Nano(), ctime: st.Ctim.Nano()}
}

func identify(path string) (fileID, bool) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return fileID{}, false
	}
	return idOf(&st), true
}

// readFile reads a file and the identity of what it read: both come from
// one open file, so a replacement in between cannot be taken for it.
func readFile(path string) ([]byte, fileID, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fileID{}, err
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, fileID{}, err
	}
	data, err := io.ReadAll(f)
	return data, idOf(&st), err
}

// NewWriter returns a Writer for the spec directory root (DefaultRoot on a
// node). The directory is created on the first write.
func NewWriter(root string) (*Writer, error) {
	cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(root), cdiapi.WithAutoRefresh(false))
	if err != nil {
		return nil, fmt.Errorf("CDI cache for %q: %w", root, err)
	}
	return &Writer{root: root, cache: cache, on: map[string]written{}}, nil
}

// Path is the file a spec of kind is written to: <root>/<vendor>-<class>.yaml.
func (w *Writer) Path(kind string) string {
	vendor, class := parser.ParseQualifier(kind)
	return filepath.Join(w.root, cdiapi.GenerateSpecName(vendor, class)+".yaml")
}

// Write validates the spec and writes it atomically, unless the file already
// holds exactly these bytes. It reports whether it wrote. The Writer keeps
// the spec: the caller must not change it afterwards.
//
// A spec equal to the last one this Writer found or put in the file, over
// a file no one has replaced or edited since, is not encoded again: the
// device plugin rewrites every spec on each rescan, and the YAML encoding
// was most of what an idle plugin allocated (about 1 MB a rescan on an
// 8-GPU node). Anything else is encoded and compared with the file's bytes.
func (w *Writer) Write(spec *specs.Spec) (bool, error) {
	path := w.Path(spec.Kind)
	w.mu.Lock()
	defer w.mu.Unlock()
	if last, ok := w.on[path]; ok {
		if id, ok := identify(path); ok && id == last.file && reflect.DeepEqual(spec, last.spec) {
			return false, nil
		}
		delete(w.on, path)
	}
	data, err := yaml.Marshal(spec)
	if err != nil {
		return false, fmt.Errorf("write CDI spec %s: %w", spec.Kind, err)
	}
	// The cache writes YAML as a document with a leading marker.
	data = append([]byte("---\n"), data...)
	if old, id, err := readFile(path); err == nil && bytes.Equal(old, data) {
		w.on[path] = written{spec: spec, file: id}
		return false, nil
	}
	if err := w.cache.WriteSpec(spec, filepath.Base(path)); err != nil {
		return false, fmt.Errorf("write CDI spec %s to %q: %w", spec.Kind, path, err)
	}
	faultinject.Point("cdi: renamed " + path)
	if err := atomicfile.Sync(path); err != nil {
		return true, fmt.Errorf("write CDI spec %s: %w", spec.Kind, err)
	}
	// Remembered only if the file still holds what was written: another
	// writer may have replaced it since the rename.
	if now, id, err := readFile(path); err == nil && bytes.Equal(now, data) {
		w.on[path] = written{spec: spec, file: id}
	}
	return true, nil
}

// Remove deletes the spec of kind. A spec that is not there is not an error.
func (w *Writer) Remove(kind string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	delete(w.on, w.Path(kind))
	if err := w.cache.RemoveSpec(filepath.Base(w.Path(kind))); err != nil {
		return fmt.Errorf("remove CDI spec %s: %w", kind, err)
	}
	return nil
}

// NewPassthroughSpec builds the nvidia.com/pgpu spec: every GPU among
// devices that vfio holds whole, named by index, by address and by IOMMU
// group (NewSpec with ByIndex and ByGroup): the names the GPU Operator's
// pods use. Whoever writes the spec writes these bytes.
func NewPassthroughSpec(devices []*vfio.Passthrough, opts NodeOptions) (*specs.Spec, error) {
	var gpus []*vfio.Passthrough
	for _, p := range devices {
		if p.Role == vfio.RoleGPU && p.Ready() {
			gpus = append(gpus, p)
		}
	}
	return NewSpec(PassthroughKind, gpus, SpecOptions{NodeOptions: opts, ByIndex: true, ByGroup: true})
}
