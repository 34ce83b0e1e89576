package sandboxplugin_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"

	"github.com/gpu-sandbox/gpu-sandbox/internal/sandboxplugin"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/deviceplugin/deviceplugintest"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
)

const (
	h100     = "nvidia.com/GH100_H100_SXM5_80GB"
	nvswitch = "nvidia.com/nvswitch"
)

// node is a fake node with a kubelet stand-in and the agent's config.
type node struct {
	tree    *vfiotest.Tree
	emu     *vfiotest.Emulator
	kubelet *deviceplugintest.Kubelet
	cfg     sandboxplugin.Config
	logs    *syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func newNode(t testing.TB, n vfiotest.Node, startKubelet bool) *node {
	t.Helper()
	tree, emu := vfiotest.New(t, n)
	dir := filepath.Join(t.TempDir(), "device-plugins")
	if err := os.MkdirAll(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	logs := &syncBuffer{}
	log := logrus.New()
	log.SetOutput(logs)
	nd := &node{tree: tree, emu: emu, logs: logs, cfg: sandboxplugin.Config{
		PluginDir: dir, SysfsRoot: tree.SysfsRoot, DevRoot: tree.DevRoot, CDIRoot: filepath.Join(t.TempDir(), "cdi"),
		VFIOMode: "auto", NVSwitchAlias: "nvswitch", PollInterval: 20 * time.Millisecond, RescanInterval: time.Minute,
		Log: log,
	}}
	if startKubelet {
		nd.kubelet = deviceplugintest.Start(t, dir)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("agent logs:\n%s", logs)
		}
	})
	return nd
}

// run starts the agent; the returned function stops it and checks it ended
// cleanly.
func (n *node) run(t testing.TB) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- sandboxplugin.Run(ctx, n.cfg) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run: %v\nlogs:\n%s", err, n.logs)
				}
			case <-time.After(10 * time.Second):
				t.Errorf("Run did not return after cancel")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

func allocate(t *testing.T, p *deviceplugintest.Plugin, ids ...string) (*pluginapi.ContainerAllocateResponse, error) {
	t.Helper()
	resp, err := p.Client.Allocate(context.Background(), &pluginapi.AllocateRequest{
		ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: ids}}})
	if err != nil {
		return nil, err
	}
	return resp.ContainerResponses[0], nil
}

func count(list []*pluginapi.Device, health string) int {
	n := 0
	for _, d := range list {
		if d.Health == health {
			n++
		}
	}
	return n
}

func TestAdvertisesHGX(t *testing.T) {
	n := newNode(t, vfiotest.BoundToVFIO(vfiotest.HGXH100()), true)
	stop := n.run(t)
	gpus := n.kubelet.WaitForDevices(h100, func(l []*pluginapi.Device) bool { return count(l, pluginapi.Healthy) == 8 })
	switches := n.kubelet.WaitForDevices(nvswitch, func(l []*pluginapi.Device) bool { return count(l, pluginapi.Healthy) == 4 })
	if got := len(n.kubelet.Registrations()); got != 2 {
		t.Errorf("%d registrations, want one per resource", got)
	}
	for _, d := range gpus.Devices() {
		want := int64(0)
		if slices.Index(vfiotest.HGXH100GPUs, d.ID) >= 4 {
			want = 1
		}
		if d.Topology == nil || d.Topology.Nodes[0].ID != want {
			t.Errorf("%s: topology %v, want NUMA node %d", d.ID, d.Topology, want)
		}
	}
	if !gpus.Options.GetPreferredAllocationAvailable {
		t.Error("preferred allocation not offered")
	}
	_ = switches

	resp, err := allocate(t, gpus, "0000:2a:00.0", "0000:18:00.0")
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, d := range resp.Devices {
		paths = append(paths, d.HostPath)
		if d.ContainerPath != d.HostPath || d.Permissions != "mrw" {
			t.Errorf("device spec %+v", d)
		}
	}
	if !slices.Equal(paths, []string{"/dev/vfio/21", "/dev/vfio/20", "/dev/vfio/vfio"}) {
		t.Errorf("device nodes %v", paths)
	}
	if env := resp.Envs["PCI_RESOURCE_NVIDIA_COM_GH100_H100_SXM5_80GB"]; env != "0000:2a:00.0,0000:18:00.0" {
		t.Errorf("env %v", resp.Envs)
	}
	var cdiNames []string
	for _, d := range resp.CdiDevices {
		cdiNames = append(cdiNames, d.Name)
	}
	if !slices.Equal(cdiNames, []string{h100 + "=0000:2a:00.0", h100 + "=0000:18:00.0"}) {
		t.Errorf("CDI devices %v", cdiNames)
	}

	// The CDI names handed out resolve to the same group nodes in the specs.
	cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(n.cfg.CDIRoot), cdiapi.WithAutoRefresh(false))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range append(cdiNames, "nvidia.com/pgpu=0", "nvidia.com/pgpu=0000:db:00.0", nvswitch+"=0000:05:00.0") {
		if cache.GetDevice(name) == nil {
			t.Errorf("CDI device %s not in the specs (errors: %v)", name, cache.GetErrors())
		}
	}
	if d := cache.GetDevice(h100 + "=0000:2a:00.0"); d != nil && d.ContainerEdits.DeviceNodes[0].Path != "/dev/vfio/21" {
		t.Errorf("CDI device for 0000:2a:00.0 opens %s", d.ContainerEdits.DeviceNodes[0].Path)
	}

	pref, err := gpus.Client.GetPreferredAllocation(context.Background(), &pluginapi.PreferredAllocationRequest{
		ContainerRequests: []*pluginapi.ContainerPreferredAllocationRequest{{
			AvailableDeviceIDs: vfiotest.HGXH100GPUs, MustIncludeDeviceIDs: []string{"0000:ab:00.0"}, AllocationSize: 4}}})
	if err != nil {
		t.Fatal(err)
	}
	got := pref.ContainerResponses[0].DeviceIDs
	slices.Sort(got)
	if !slices.Equal(got, vfiotest.HGXH100GPUs[4:]) {
		t.Errorf("preferred %v; want the four GPUs of NUMA node 1", got)
	}

	// Stopping (a rollout) keeps the CDI specs for the names handed out;
	// Uninstall removes them, and only them.
	stop()
	specs, _ := os.ReadDir(n.cfg.CDIRoot)
	if len(specs) != 3 {
		t.Errorf("CDI specs after stop: %v; want the three kept", specs)
	}
	toolkit := filepath.Join(n.cfg.CDIRoot, "nvidia.com-gpu.yaml")
	os.WriteFile(toolkit, []byte("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: \"0\"\n  containerEdits:\n    deviceNodes:\n    - path: /dev/nvidia0\n"), 0o644)
	if err := sandboxplugin.Uninstall(n.cfg); err != nil {
		t.Fatal(err)
	}
	if entries, _ := os.ReadDir(n.cfg.CDIRoot); len(entries) != 1 || entries[0].Name() != "nvidia.com-gpu.yaml" {
		t.Errorf("after Uninstall: %v; want only the container toolkit's spec", entries)
	}
	for _, r := range n.kubelet.Registrations() {
		if _, err := os.Stat(filepath.Join(n.cfg.PluginDir, r.Endpoint)); err == nil {
			t.Errorf("socket %s left after stop", r.Endpoint)
		}
	}
}

func TestHealthFollowsNodesAndDrivers(t *testing.T) {
	n := newNode(t, vfiotest.BoundToVFIO(vfiotest.HGXH100()), true)
	n.run(t)
	gpus := n.kubelet.WaitForDevices(h100, func(l []*pluginapi.Device) bool { return count(l, pluginapi.Healthy) == 8 })
	health := func(id, want string) {
		t.Helper()
		n.kubelet.WaitForDevices(h100, func(l []*pluginapi.Device) bool {
			return deviceplugintest.Health(l, id) == want
		})
	}

	// The group node disappears and comes back.
	node := n.tree.GroupNode(22)
	if err := os.Rename(node, node+".gone"); err != nil {
		t.Fatal(err)
	}
	health("0000:3a:00.0", pluginapi.Unhealthy)
	if _, err := allocate(t, gpus, "0000:3a:00.0"); err == nil || !strings.Contains(err.Error(), "0000:3a:00.0") {
		t.Errorf("allocation of an unhealthy device: %v", err)
	}
	if err := os.Rename(node+".gone", node); err != nil {
		t.Fatal(err)
	}
	health("0000:3a:00.0", pluginapi.Healthy)

	// The driver changes away from vfio-pci, then back.
	write(t, n.tree, "bus/pci/drivers/vfio-pci/unbind", "0000:5d:00.0")
	health("0000:5d:00.0", pluginapi.Unhealthy)
	write(t, n.tree, "bus/pci/devices/0000:5d:00.0/driver_override", "vfio-pci")
	write(t, n.tree, "bus/pci/drivers_probe", "0000:5d:00.0")
	health("0000:5d:00.0", pluginapi.Healthy)

	// The device leaves the bus.
	if err := n.emu.RemoveDevice("0000:db:00.0"); err != nil {
		t.Fatal(err)
	}
	health("0000:db:00.0", pluginapi.Unhealthy)
	if !strings.Contains(n.logs.String(), "device unhealthy") {
		t.Errorf("health changes not logged:\n%s", n.logs)
	}
}

func write(t *testing.T, tree *vfiotest.Tree, attr, value string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(tree.SysfsRoot, attr), []byte(value), 0); err != nil {
		t.Fatal(err)
	}
}

func TestAliasPGPU(t *testing.T) {
	n := newNode(t, vfiotest.BoundToVFIO(vfiotest.HGXH100()), true)
	n.cfg.GPUAlias = "pgpu"
	n.run(t)
	p := n.kubelet.WaitForDevices("nvidia.com/pgpu", func(l []*pluginapi.Device) bool { return count(l, pluginapi.Healthy) == 8 })
	resp, err := allocate(t, p, "0000:db:00.0")
	if err != nil {
		t.Fatal(err)
	}
	if resp.CdiDevices[0].Name != "nvidia.com/pgpu=0000:db:00.0" || resp.Envs["PCI_RESOURCE_NVIDIA_COM_PGPU"] != "0000:db:00.0" {
		t.Errorf("allocate: %+v", resp)
	}
	entries, _ := os.ReadDir(n.cfg.CDIRoot)
	var files []string
	for _, e := range entries {
		files = append(files, e.Name())
	}
	if !slices.Equal(files, []string{"nvidia.com-nvswitch.yaml", "nvidia.com-pgpu.yaml"}) {
		t.Errorf("CDI specs %v; want one pgpu spec (no second spec of the same kind)", files)
	}
}

func TestNoGPUsThenBoundLater(t *testing.T) {
	n := newNode(t, vfiotest.A10WithAudio(), false)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	n.cfg.HealthAddress = addr
	n.run(t)
	get := func(path string) int {
		deadline := time.Now().Add(5 * time.Second)
		for {
			resp, err := http.Get("http://" + addr + path)
			if err == nil {
				resp.Body.Close()
				return resp.StatusCode
			}
			if time.Now().After(deadline) {
				t.Fatalf("GET %s: %v", path, err)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	if code := get("/healthz"); code != 200 {
		t.Errorf("/healthz %d with no GPUs", code)
	}

	// The kubelet comes up after the plugin; then the GPU is bound.
	n.kubelet = deviceplugintest.Start(t, n.cfg.PluginDir)
	for _, d := range []struct{ addr, drv string }{{"0000:65:00.0", "nvidia"}, {"0000:65:00.1", "snd_hda_intel"}} {
		write(t, n.tree, "bus/pci/devices/"+d.addr+"/driver_override", "vfio-pci")
		write(t, n.tree, "bus/pci/drivers/"+d.drv+"/unbind", d.addr)
		write(t, n.tree, "bus/pci/drivers_probe", d.addr)
	}
	t.Cleanup(func() {
		if t.Failed() {
			e, _ := os.ReadDir(n.tree.DevRoot + "/vfio")
			t.Logf("drivers %q %q, /dev/vfio %v", n.tree.Driver("0000:65:00.0"), n.tree.Driver("0000:65:00.1"), e)
		}
	})
	n.kubelet.WaitForDevices("nvidia.com/GA102GL_A10", func(l []*pluginapi.Device) bool {
		return deviceplugintest.Health(l, "0000:65:00.0") == pluginapi.Healthy
	})
	deadline := time.Now().Add(5 * time.Second)
	for get("/readyz") != 200 {
		if time.Now().After(deadline) {
			t.Fatal("/readyz not 200 after registration")
		}
		time.Sleep(5 * time.Millisecond)
	}
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body bytes.Buffer
	body.ReadFrom(resp.Body)
	if !strings.Contains(body.String(), `gpu_sandbox_devices{health="healthy",resource="nvidia.com/GA102GL_A10"} 1`) {
		t.Errorf("metrics:\n%s", body.String())
	}
}

func TestIOMMUFD(t *testing.T) {
	spec := vfiotest.BoundToVFIO(vfiotest.A10WithAudio())
	spec.CDev = true
	n := newNode(t, spec, true)
	n.run(t)
	p := n.kubelet.WaitForDevices("nvidia.com/GA102GL_A10", func(l []*pluginapi.Device) bool { return count(l, pluginapi.Healthy) == 1 })
	resp, err := allocate(t, p, "0000:65:00.0")
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, d := range resp.Devices {
		paths = append(paths, d.HostPath)
	}
	if len(paths) != 3 || !strings.HasPrefix(paths[0], "/dev/vfio/devices/vfio") || paths[2] != "/dev/iommu" {
		t.Errorf("iommufd device nodes %v; want both functions' cdevs and /dev/iommu", paths)
	}
	for _, path := range paths {
		if path == "/dev/vfio/vfio" || strings.HasPrefix(path, "/dev/vfio/2") {
			t.Errorf("legacy node %s in iommufd mode", path)
		}
	}
}

func TestModelsThatSanitiseAlikeShareOneResource(t *testing.T) {
	ids := filepath.Join(t.TempDir(), "pci.ids")
	if err := os.WriteFile(ids, []byte("10de  NVIDIA Corporation\n\t2236  GA102GL [A10]\n\t2237  GA102GL A10\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	spec := vfiotest.BoundToVFIO(vfiotest.GroupWithNIC())
	spec.Devices = slices.DeleteFunc(spec.Devices, func(d vfiotest.Device) bool { return d.Vendor != vfiotest.VendorNVIDIA })
	spec.Devices[1].DeviceID = 0x2237
	n := newNode(t, spec, true)
	n.cfg.PCIIDs = ids
	n.run(t)
	n.kubelet.WaitForDevices("nvidia.com/GA102GL_A10", func(l []*pluginapi.Device) bool { return count(l, pluginapi.Healthy) == 2 })
	if regs := n.kubelet.Registrations(); len(regs) != 1 {
		t.Errorf("%d registrations; want one resource, one socket", len(regs))
	}
}

func TestUnreadableDeviceIsSkipped(t *testing.T) {
	n := newNode(t, vfiotest.BoundToVFIO(vfiotest.HGXH100()), true)
	if err := os.Remove(filepath.Join(n.tree.SysfsRoot, "bus/pci/devices/0000:18:00.0/vendor")); err != nil {
		t.Fatal(err)
	}
	n.run(t)
	n.kubelet.WaitForDevices(h100, func(l []*pluginapi.Device) bool { return count(l, pluginapi.Healthy) == 7 })
	if !strings.Contains(n.logs.String(), "0000:18:00.0") {
		t.Errorf("the skipped device is not named in the logs:\n%s", n.logs)
	}
}

// A /dev event changes exactly the devices whose node it names, from what
// the event says, with no read of sysfs in between; the full rescan follows
// on its timer. Guards against going back to a rescan per event (1.4 ms to
// Unhealthy across processes, where the event alone takes microseconds).
// A node coming back makes its device healthy again, but only once the CDI
// spec carries the node's new device number.
func TestNodeEventChangesOnlyItsDevice(t *testing.T) {
	n := newNode(t, vfiotest.BoundToVFIO(vfiotest.HGXH100()), true)
	n.cfg.PollInterval = time.Hour // no scan but the settle timer's
	n.run(t)
	gpus := n.kubelet.WaitForDevices(h100, func(l []*pluginapi.Device) bool { return count(l, pluginapi.Healthy) == 8 })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := gpus.Client.ListAndWatch(ctx, &pluginapi.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	// next returns the next list that differs from the last one.
	var last []*pluginapi.Device
	next := func() []*pluginapi.Device {
		t.Helper()
		for {
			resp, err := stream.Recv()
			if err != nil {
				t.Fatalf("ListAndWatch: %v", err)
			}
			if !slices.EqualFunc(resp.Devices, last, func(a, b *pluginapi.Device) bool { return a.ID == b.ID && a.Health == b.Health }) {
				last = resp.Devices
				return last
			}
		}
	}
	unhealthy := func(l []*pluginapi.Device) []string {
		var ids []string
		for _, d := range l {
			if d.Health != pluginapi.Healthy {
				ids = append(ids, d.ID)
			}
		}
		return ids
	}
	if got := unhealthy(next()); len(got) != 0 {
		t.Fatalf("unhealthy at start: %v", got)
	}

	// A change only a full scan sees: 0000:18:00.0 can no longer be read.
	// A scan at the event would take it out with the device the event names.
	vendor := filepath.Join(n.tree.SysfsRoot, "bus/pci/devices/0000:18:00.0/vendor")
	if err := os.Rename(vendor, vendor+".away"); err != nil {
		t.Fatal(err)
	}
	node := n.tree.GroupNode(22) // 0000:3a:00.0
	if err := os.Rename(node, node+".gone"); err != nil {
		t.Fatal(err)
	}
	if got := unhealthy(next()); !slices.Equal(got, []string{"0000:3a:00.0"}) {
		t.Fatalf("after its node went, unhealthy %v; want exactly 0000:3a:00.0", got)
	}
	// The settle timer's full scan follows and sees the unreadable device.
	if got := unhealthy(next()); !slices.Equal(got, []string{"0000:18:00.0", "0000:3a:00.0"}) {
		t.Fatalf("after the rescan, unhealthy %v; want 0000:18:00.0 and 0000:3a:00.0", got)
	}
	if err := os.Rename(vendor+".away", vendor); err != nil {
		t.Fatal(err)
	}

	// The kernel gives the group a new minor when it comes back.
	if err := os.WriteFile(filepath.Join(n.tree.SysfsRoot, "class/vfio/22/dev"), []byte("243:99\n"), 0o444); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(node+".gone", node); err != nil {
		t.Fatal(err)
	}
	got := unhealthy(next())
	// At the moment the kubelet hears of it, the spec names the new node.
	cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(n.cfg.CDIRoot), cdiapi.WithAutoRefresh(false))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, []string{"0000:18:00.0"}) {
		t.Fatalf("after its node came back, unhealthy %v; want only 0000:18:00.0, which waits for a scan", got)
	}
	d := cache.GetDevice(h100 + "=0000:3a:00.0")
	if d == nil {
		t.Fatalf("0000:3a:00.0 healthy before its CDI device is written (errors %v)", cache.GetErrors())
	}
	if nodes := d.ContainerEdits.DeviceNodes; len(nodes) != 1 || nodes[0].Major != 243 || nodes[0].Minor != 99 {
		t.Errorf("0000:3a:00.0 healthy while its CDI spec names %+v; want the new node 243:99", nodes[0])
	}
	if got := unhealthy(next()); len(got) != 0 {
		t.Fatalf("after the rescan, unhealthy %v; want none", got)
	}
}

// Kata's cold plug takes what the kubelet assigned, a resource and device
// IDs, and asks the CDI cache for <resource>=<ID>. That resolves for every
// device of every resource, on known boards and on a GPU pci.ids has not
// heard of (new boards arrive before the database): the resource name is
// the CDI kind.
func TestKataColdPlugNames(t *testing.T) {
	unknown := vfiotest.BoundToVFIO(vfiotest.A10WithAudio())
	unknown.Devices[0].DeviceID = 0x3ffe
	for name, tc := range map[string]struct {
		node vfiotest.Node
		want []string
	}{
		"HGX":         {vfiotest.BoundToVFIO(vfiotest.HGXH100()), []string{h100, nvswitch}},
		"L40S":        {vfiotest.BoundToVFIO(vfiotest.TwoSocketL40S()), []string{"nvidia.com/AD102GL_L40S"}},
		"unknown GPU": {unknown, []string{"nvidia.com/pgpu-3ffe"}},
	} {
		t.Run(name, func(t *testing.T) {
			n := newNode(t, tc.node, true)
			n.run(t)
			plugins := n.kubelet.WaitFor("every device healthy", func(m map[string]*deviceplugintest.Plugin) bool {
				for _, r := range tc.want {
					if m[r] == nil || len(m[r].Devices()) == 0 || count(m[r].Devices(), pluginapi.Healthy) != len(m[r].Devices()) {
						return false
					}
				}
				return len(m) == len(tc.want)
			})
			cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(n.cfg.CDIRoot), cdiapi.WithAutoRefresh(false))
			if err != nil {
				t.Fatal(err)
			}
			for resource, p := range plugins {
				for _, d := range p.Devices() {
					name := resource + "=" + d.ID
					if cache.GetDevice(name) == nil {
						t.Errorf("Kata asks for %s: not in the CDI specs (%v)", name, cache.GetErrors())
					}
					resp, err := allocate(t, p, d.ID)
					if err != nil {
						t.Fatal(err)
					}
					if len(resp.CdiDevices) != 1 || resp.CdiDevices[0].Name != name {
						t.Errorf("Allocate(%s) names %v; want %s", d.ID, resp.CdiDevices, name)
					}
				}
			}
		})
	}
}

// GPUs that share an IOMMU group (a switch without ACS) are one device, as
// VFIO can only give the group whole, and that is made visible: the log at
// start, the metric, the CDI entry's annotations, and every GPU's address
// resolving to the group's device.
func TestSharedGroupsAreOneVisibleDevice(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	n := newNode(t, vfiotest.BoundToVFIO(vfiotest.TwoSocketL40SNoACS()), true)
	n.cfg.HealthAddress = addr
	n.run(t)
	const l40s = "nvidia.com/AD102GL_L40S"
	p := n.kubelet.WaitForDevices(l40s, func(l []*pluginapi.Device) bool { return count(l, pluginapi.Healthy) == 4 })
	gpus := vfiotest.TwoSocketL40SGPUs
	var ids []string
	for _, d := range p.Devices() {
		ids = append(ids, d.ID)
	}
	slices.Sort(ids)
	if want := []string{gpus[0], gpus[2], gpus[4], gpus[6]}; !slices.Equal(ids, want) {
		t.Errorf("devices %v; want one per group, %v", ids, want)
	}
	if !strings.Contains(n.logs.String(), "IOMMU group 80 holds 2 devices") || !strings.Contains(n.logs.String(), gpus[0]+","+gpus[1]) {
		t.Errorf("no log line says group 80 carries %s and %s:\n%s", gpus[0], gpus[1], n.logs)
	}

	cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(n.cfg.CDIRoot), cdiapi.WithAutoRefresh(false))
	if err != nil {
		t.Fatal(err)
	}
	for i, gpu := range gpus {
		for _, kind := range []string{l40s, "nvidia.com/pgpu"} {
			d := cache.GetDevice(kind + "=" + gpu)
			if d == nil {
				t.Errorf("%s=%s does not resolve (%v)", kind, gpu, cache.GetErrors())
				continue
			}
			group := fmt.Sprintf("/dev/vfio/%d", 80+i/2)
			if d.ContainerEdits.DeviceNodes[0].Path != group {
				t.Errorf("%s=%s opens %s, want %s", kind, gpu, d.ContainerEdits.DeviceNodes[0].Path, group)
			}
			pair := gpus[i&^1] + "," + gpus[i|1]
			if d.Annotations["gpu-sandbox.io/iommu-group-device-count"] != "2" || d.Annotations["gpu-sandbox.io/iommu-group-devices"] != pair {
				t.Errorf("%s=%s annotations %v; want 2 devices, %s", kind, gpu, d.Annotations, pair)
			}
		}
	}

	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body bytes.Buffer
	body.ReadFrom(resp.Body)
	if !strings.Contains(body.String(), `gpu_sandbox_shared_iommu_groups{resource="`+l40s+`"} 4`) {
		t.Errorf("metrics do not count 4 shared groups:\n%s", body.String())
	}
}

// After NVIDIA's sandbox device plugin is swapped for ours, the kubelet's
// checkpoint still holds running pods' GPUs under NVIDIA's IDs (IOMMU
// group numbers), which the kubelet cannot match with ours: such a device
// stays Unhealthy, so that no second pod gets it, until the checkpoint no
// longer holds it.
func TestForeignCheckpointKeepsAssignedDevices(t *testing.T) {
	n := newNode(t, vfiotest.BoundToVFIO(vfiotest.HGXH100()), true)
	checkpoint := filepath.Join(n.cfg.PluginDir, sandboxplugin.CheckpointFile)
	write := func(entries string) {
		t.Helper()
		// As the kubelet writes it: a new file renamed into place.
		tmp := checkpoint + ".tmp"
		data := `{"Data":{"PodDeviceEntries":[` + entries + `],"RegisteredDevices":{}},"Checksum":1}`
		if err := os.WriteFile(tmp, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, checkpoint); err != nil {
			t.Fatal(err)
		}
	}
	// Group 21 is 0000:2a:00.0; NVIDIA's container plugin's index IDs on
	// another resource, and our own IDs, claim nothing.
	write(`{"PodUID":"vm-pod","ContainerName":"cuda","ResourceName":"` + h100 + `","DeviceIDs":{"0":["21"]},"AllocResp":""},
		{"PodUID":"ctr-pod","ContainerName":"c","ResourceName":"nvidia.com/gpu","DeviceIDs":{"1":["24"]},"AllocResp":""},
		{"PodUID":"our-pod","ContainerName":"c","ResourceName":"` + h100 + `","DeviceIDs":["0000:db:00.0"],"AllocResp":""}`)
	n.run(t)
	p := n.kubelet.WaitForDevices(h100, func(l []*pluginapi.Device) bool { return count(l, pluginapi.Healthy) == 7 })
	for _, d := range p.Devices() {
		if (d.Health == pluginapi.Healthy) == (d.ID == "0000:2a:00.0") {
			t.Errorf("%s is %s", d.ID, d.Health)
		}
	}
	if _, err := allocate(t, p, "0000:2a:00.0"); err == nil {
		t.Error("Allocate gave the GPU the checkpoint assigns to vm-pod")
	}
	if !strings.Contains(n.logs.String(), "pod vm-pod container cuda as "+h100+"=21") {
		t.Errorf("the log does not name the pod holding the GPU:\n%s", n.logs)
	}
	// The pod is gone: the kubelet rewrites its checkpoint, the GPU is free.
	write(`{"PodUID":"our-pod","ContainerName":"c","ResourceName":"` + h100 + `","DeviceIDs":{"1":["0000:db:00.0"]},"AllocResp":""}`)
	n.kubelet.WaitForDevices(h100, func(l []*pluginapi.Device) bool { return count(l, pluginapi.Healthy) == 8 })
}
