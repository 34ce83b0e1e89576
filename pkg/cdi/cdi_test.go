package cdi_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"testing"
	"time"

	oci "github.com/opencontainers/runtime-spec/specs-go"
	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"
	specs "tags.cncf.io/container-device-interface/specs-go"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/cdi"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
)

// boundNode binds every GPU of the preset to vfio and returns what the
// device plugin would discover.
func boundNode(t testing.TB, n vfiotest.Node) (*vfio.Sysfs, []*vfio.Passthrough) {
	t.Helper()
	tree, _ := vfiotest.New(t, n)
	m := vfio.NewManager(t.TempDir(), vfio.WithSysfsRoot(tree.SysfsRoot), vfio.WithDevRoot(tree.DevRoot),
		vfio.WithHostRoot(tree.HostRoot), vfio.WithTimeout(2*time.Second))
	devices, _ := m.Sysfs().Devices()
	sel, _ := vfio.ParseSelector("", false)
	plan, _ := vfio.NewPlanAll(devices, sel)
	res, err := m.Bind(context.Background(), plan)
	if err != nil || res.Err() != nil {
		t.Fatalf("bind: %v %v", err, res.Err())
	}
	devices, _ = m.Sysfs().Devices()
	return m.Sysfs(), vfio.FindPassthrough(devices, sel)
}

func TestPassthroughSpecLegacy(t *testing.T) {
	sysfs, devices := boundNode(t, vfiotest.HGXH100())
	spec, err := cdi.NewSpec(cdi.PassthroughKind, devices, cdi.SpecOptions{NodeOptions: cdi.NodeOptions{Sysfs: sysfs}, ByIndex: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(spec.Devices) != 16 {
		t.Fatalf("%d devices, want each of 8 GPUs by index and by address", len(spec.Devices))
	}
	for i, addr := range vfiotest.HGXH100GPUs {
		byIndex, byAddr := spec.Devices[i], spec.Devices[8+i]
		if byIndex.Name != string(rune('0'+i)) || byAddr.Name != addr {
			t.Errorf("names %q and %q, want %d and %s", byIndex.Name, byAddr.Name, i, addr)
		}
		nodes := byAddr.ContainerEdits.DeviceNodes
		if len(nodes) != 1 || nodes[0].Path != "/dev/vfio/"+itoa(20+i) || nodes[0].Type != "c" || nodes[0].Major != 243 {
			t.Errorf("%s: nodes %+v", addr, nodes[0])
		}
		if nodes[0] != byIndex.ContainerEdits.DeviceNodes[0] && *nodes[0] != *byIndex.ContainerEdits.DeviceNodes[0] {
			t.Errorf("%s: index and address names differ", addr)
		}
	}
	common := spec.ContainerEdits.DeviceNodes
	if len(common) != 1 || common[0].Path != "/dev/vfio/vfio" || common[0].Major != 10 || common[0].Minor != 196 {
		t.Errorf("common nodes %+v", common)
	}
}

func TestSpecIOMMUFD(t *testing.T) {
	n := vfiotest.A10WithAudio()
	n.CDev = true
	sysfs, devices := boundNode(t, n)
	spec, err := cdi.NewSpec("nvidia.com/GA102GL_A10", devices, cdi.SpecOptions{NodeOptions: cdi.NodeOptions{Mode: vfio.ModeIOMMUFD, Sysfs: sysfs}})
	if err != nil {
		t.Fatal(err)
	}
	// The audio function's address names the same device.
	if len(spec.Devices) != 2 || spec.Devices[0].Name != "0000:65:00.0" || spec.Devices[1].Name != "0000:65:00.1" ||
		!reflect.DeepEqual(spec.Devices[0].ContainerEdits, spec.Devices[1].ContainerEdits) {
		t.Fatalf("devices %+v", spec.Devices)
	}
	var paths []string
	for _, n := range spec.Devices[0].ContainerEdits.DeviceNodes {
		paths = append(paths, n.Path)
		if n.Major != 511 {
			t.Errorf("%s: major %d", n.Path, n.Major)
		}
	}
	// The GPU and its audio function each bring their cdev; no group node.
	if len(paths) != 2 || paths[0] == paths[1] || filepath.Dir(paths[0]) != "/dev/vfio/devices" {
		t.Errorf("device nodes %v", paths)
	}
	if c := spec.ContainerEdits.DeviceNodes; len(c) != 1 || c[0].Path != "/dev/iommu" {
		t.Errorf("common nodes %+v", c)
	}

	// Without cdevs, iommufd mode cannot be had.
	_, legacy := boundNode(t, vfiotest.A10WithAudio())
	if _, err := cdi.NewSpec(cdi.PassthroughKind, legacy, cdi.SpecOptions{NodeOptions: cdi.NodeOptions{Mode: vfio.ModeIOMMUFD}}); !errors.Is(err, vfio.ErrNoCDev) {
		t.Errorf("error %v; want ErrNoCDev", err)
	}
	if _, err := cdi.NewSpec(cdi.PassthroughKind, nil, cdi.SpecOptions{}); !errors.Is(err, cdi.ErrNoDevices) {
		t.Errorf("error %v; want ErrNoDevices", err)
	}
}

func TestWriterWritesOnlyChangesAndInjects(t *testing.T) {
	sysfs, devices := boundNode(t, vfiotest.HGXH100())
	root := filepath.Join(t.TempDir(), "cdi")
	w, err := cdi.NewWriter(root)
	if err != nil {
		t.Fatal(err)
	}
	spec, err := cdi.NewSpec(cdi.PassthroughKind, devices, cdi.SpecOptions{NodeOptions: cdi.NodeOptions{Sysfs: sysfs}, ByIndex: true})
	if err != nil {
		t.Fatal(err)
	}
	if wrote, err := w.Write(spec); !wrote || err != nil {
		t.Fatalf("first write: %v, %v", wrote, err)
	}
	path := filepath.Join(root, "nvidia.com-pgpu.yaml")
	if w.Path(cdi.PassthroughKind) != path {
		t.Errorf("path %q", w.Path(cdi.PassthroughKind))
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("spec file: %v, %v", fi, err)
	}
	again, _ := cdi.NewSpec(cdi.PassthroughKind, devices, cdi.SpecOptions{NodeOptions: cdi.NodeOptions{Sysfs: sysfs}, ByIndex: true})
	if wrote, err := w.Write(again); wrote || err != nil {
		t.Errorf("rewrite of the same spec: wrote %v, %v", wrote, err)
	}

	// A runtime's view: the library resolves the names and edits an OCI spec.
	cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(root), cdiapi.WithAutoRefresh(false))
	if err != nil {
		t.Fatal(err)
	}
	if errs := cache.GetErrors(); len(errs) != 0 {
		t.Fatalf("the library rejects the spec: %v", errs)
	}
	if got := cache.ListDevices(); !slices.Contains(got, "nvidia.com/pgpu=0") || !slices.Contains(got, "nvidia.com/pgpu=0000:db:00.0") {
		t.Errorf("devices listed %v", got)
	}
	ociSpec := &oci.Spec{}
	if unresolved, err := cache.InjectDevices(ociSpec, "nvidia.com/pgpu=1"); err != nil {
		t.Fatalf("inject: %v (unresolved %v)", err, unresolved)
	}
	var injected []string
	for _, d := range ociSpec.Linux.Devices {
		injected = append(injected, d.Path)
	}
	if !slices.Equal(injected, []string{"/dev/vfio/vfio", "/dev/vfio/21"}) && !slices.Equal(injected, []string{"/dev/vfio/21", "/dev/vfio/vfio"}) {
		t.Errorf("injected %v; want GPU 1's group and /dev/vfio/vfio", injected)
	}

	if err := w.Remove(cdi.PassthroughKind); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Error("spec still there after Remove")
	}
	if err := w.Remove(cdi.PassthroughKind); err != nil {
		t.Errorf("second Remove: %v", err)
	}
}

// An unchanged spec is not written again, but whatever happened to the
// file since (an edit in place, a replacement, a removal) is undone.
func TestWriterRestoresAFileChangedBehindIt(t *testing.T) {
	sysfs, devices := boundNode(t, vfiotest.A10WithAudio())
	root := filepath.Join(t.TempDir(), "cdi")
	w, err := cdi.NewWriter(root)
	if err != nil {
		t.Fatal(err)
	}
	build := func() *specs.Spec {
		spec, err := cdi.NewSpec(cdi.PassthroughKind, devices, cdi.SpecOptions{NodeOptions: cdi.NodeOptions{Sysfs: sysfs}, ByIndex: true})
		if err != nil {
			t.Fatal(err)
		}
		return spec
	}
	if wrote, err := w.Write(build()); !wrote || err != nil {
		t.Fatalf("first write: %v, %v", wrote, err)
	}
	path := w.Path(cdi.PassthroughKind)
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	same := func(what string) {
		t.Helper()
		if wrote, err := w.Write(build()); wrote || err != nil {
			t.Errorf("%s: wrote %v, %v; want nothing to do", what, wrote, err)
		}
	}
	restored := func(what string) {
		t.Helper()
		if wrote, err := w.Write(build()); !wrote || err != nil {
			t.Errorf("%s: wrote %v, %v; want the spec written again", what, wrote, err)
		}
		if got, _ := os.ReadFile(path); !bytes.Equal(got, want) {
			t.Errorf("%s: the file holds\n%s\nwant\n%s", what, got, want)
		}
	}
	same("unchanged")

	// An edit in place, of the same size: the time tells.
	edited := bytes.Replace(want, []byte("/dev/vfio/vfio"), []byte("/dev/vfio/xxxx"), 1)
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(edited, 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
	future := time.Now().Add(time.Hour) // past the file system's timestamp tick
	if err := os.Chtimes(path, future, future); err != nil {
		t.Fatal(err)
	}
	restored("edited in place")
	same("after the edit was undone")

	// Replaced by a rename, as editors and installers do: a new inode.
	other := filepath.Join(root, "other")
	if err := os.WriteFile(other, edited, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(other, path); err != nil {
		t.Fatal(err)
	}
	restored("replaced")

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	restored("removed")

	// A spec the writer did not write, already on disk with the same
	// bytes (a new process after a rollout), is left alone.
	fresh, err := cdi.NewWriter(root)
	if err != nil {
		t.Fatal(err)
	}
	if wrote, err := fresh.Write(build()); wrote || err != nil {
		t.Errorf("a new writer over the same bytes: wrote %v, %v", wrote, err)
	}

	// A changed spec is written, whatever is remembered.
	changed := build()
	changed.Devices = changed.Devices[:1]
	if wrote, err := w.Write(changed); !wrote || err != nil {
		t.Errorf("changed spec: wrote %v, %v", wrote, err)
	}
	if err := w.Remove(cdi.PassthroughKind); err != nil {
		t.Fatal(err)
	}
	restored("after Remove")
}

// BenchmarkWriteUnchanged is the device plugin's rescan of a node where
// nothing changed: every spec written again.
func BenchmarkWriteUnchanged(b *testing.B) {
	sysfs, devices := boundNode(b, vfiotest.HGXH100())
	w, err := cdi.NewWriter(filepath.Join(b.TempDir(), "cdi"))
	if err != nil {
		b.Fatal(err)
	}
	spec := func() *specs.Spec {
		s, err := cdi.NewSpec(cdi.PassthroughKind, devices, cdi.SpecOptions{NodeOptions: cdi.NodeOptions{Sysfs: sysfs}, ByIndex: true, ByGroup: true})
		if err != nil {
			b.Fatal(err)
		}
		return s
	}
	if _, err := w.Write(spec()); err != nil {
		b.Fatal(err)
	}
	s := spec()
	b.ReportAllocs()
	for b.Loop() {
		if wrote, err := w.Write(s); wrote || err != nil {
			b.Fatal(wrote, err)
		}
	}
}

func TestWriterRefusesInvalidSpec(t *testing.T) {
	_, devices := boundNode(t, vfiotest.A10WithAudio())
	parent := t.TempDir()
	root := filepath.Join(parent, "cdi")
	w, _ := cdi.NewWriter(root)
	for _, kind := range []string{"nvidia.com/bad name", "nvidia.com/../../etc", "../../x/y", "nvidia.com/"} {
		spec, err := cdi.NewSpec(kind, devices, cdi.SpecOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(spec); err == nil {
			t.Errorf("kind %q was written", kind)
		}
	}
	entries, _ := os.ReadDir(parent)
	inside, _ := os.ReadDir(root)
	if len(entries) > 1 || len(inside) != 0 {
		t.Errorf("files left behind: %v %v", entries, inside)
	}
}

func itoa(i int) string { return string(rune('0'+i/10)) + string(rune('0'+i%10)) }
