package e2e

import (
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
	"github.com/gpu-sandbox/gpu-sandbox/test/e2e/testbed"
)

// node is a fake node with its emulator and the flags that point the
// vfio-manager at it.
type node struct {
	tree  *vfiotest.Tree
	emu   *vfiotest.Emulator
	state string
	flags []string
}

func newNode(t *testing.T, n vfiotest.Node) *node {
	tree, emu := vfiotest.New(t, n)
	state := filepath.Join(t.TempDir(), "state")
	return &node{tree: tree, emu: emu, state: state, flags: []string{
		"--sysfs-root", tree.SysfsRoot, "--dev-root", tree.DevRoot, "--host-root", tree.HostRoot,
		"--state-dir", state, "--load-modules=false", "--timeout", "2s",
	}}
}

func (n *node) vfioManager(t *testing.T, env []string, args ...string) result {
	t.Helper()
	return run(t, "vfio-manager", env, append(args, n.flags...)...)
}

func (n *node) wantDriver(t *testing.T, addr, want string) {
	t.Helper()
	if got := n.tree.Driver(addr); got != want {
		t.Errorf("%s: driver %q, want %q", addr, got, want)
	}
}

type statusEntry struct {
	Address    string   `json:"address"`
	Vendor     string   `json:"vendor"`
	Device     string   `json:"device"`
	Class      string   `json:"class"`
	Name       string   `json:"name"`
	Role       string   `json:"role"`
	Driver     string   `json:"driver"`
	IOMMUGroup int      `json:"iommuGroup"`
	NUMANode   int      `json:"numaNode"`
	VFIODevice string   `json:"vfioDevice"`
	InUseBy    []string `json:"inUseBy"`
	For        string   `json:"for"`
	Pending    string   `json:"pending"`
	SharedWith []string `json:"sharedWith"`
}

func (n *node) status(t *testing.T, env ...string) []statusEntry {
	t.Helper()
	r := n.vfioManager(t, env, "status", "--json")
	if r.code != 0 {
		t.Fatalf("status --json: %s", r)
	}
	var entries []statusEntry
	dec := json.NewDecoder(strings.NewReader(r.stdout))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&entries); err != nil {
		t.Fatalf("status --json is not the documented array: %v\n%s", err, r.stdout)
	}
	return entries
}

// GPUs behind a PCIe switch without ACS share an IOMMU group: vfio-manager
// binds them together and status marks the group, in the table and in
// JSON, with the devices it carries.
func TestVFIOManagerSharedGroups(t *testing.T) {
	n := newNode(t, vfiotest.TwoSocketL40SNoACS())
	if r := n.vfioManager(t, nil, "bind", "--all"); r.code != 0 || !strings.Contains(r.stdout, "8 bound") {
		t.Fatalf("bind --all: %s", r)
	}
	gpus := vfiotest.TwoSocketL40SGPUs
	for i, e := range n.status(t) {
		other := gpus[i^1] // the GPU on the same switch
		if e.Address != gpus[i] || e.IOMMUGroup != 80+i/2 || !reflect.DeepEqual(e.SharedWith, []string{other}) {
			t.Errorf("entry %d: %s group %d shared with %v; want %s group %d shared with %s", i, e.Address, e.IOMMUGroup, e.SharedWith, gpus[i], 80+i/2, other)
		}
	}
	r := n.vfioManager(t, nil, "status")
	if !strings.Contains(r.stdout, "* group 80 carries 2 devices (0000:1b:00.0, 0000:1c:00.0)") ||
		!regexp.MustCompile(`0000:1c:00\.0 +10de:26b9 +gpu +80\* `).MatchString(r.stdout) {
		t.Errorf("status does not mark the shared groups:\n%s", r)
	}
}

func TestVFIOManagerBindStatusUnbindHGX(t *testing.T) {
	n := newNode(t, vfiotest.HGXH100())
	entries := n.status(t, "BIND_NVSWITCHES=true")
	if len(entries) != 12 {
		t.Fatalf("status lists %d devices, want 8 GPUs and 4 NVSwitches", len(entries))
	}
	want := statusEntry{Address: "0000:05:00.0", Vendor: "10de", Device: "22a3", Class: "0x068000",
		Name: "GH100 [H100 NVSwitch]", Role: "nvswitch", Driver: "nvidia", IOMMUGroup: 40, NUMANode: 0}
	// The default policy gives VMs every GPU: each waits to be bound.
	if e := entries[4]; e.For != "vm" || e.Pending != "bind" {
		t.Errorf("before bind, by the default policy: %+v", e)
	}
	if !reflect.DeepEqual(entries[0], want) {
		t.Errorf("first entry %+v\nwant %+v", entries[0], want)
	}
	if e := entries[4]; e.Address != "0000:18:00.0" || e.Role != "gpu" || e.Name != "GH100 [H100 SXM5 80GB]" || e.Class != "0x030200" {
		t.Errorf("first GPU entry %+v", e)
	}
	if got := len(n.status(t)); got != 8 {
		t.Errorf("status without NVSwitches lists %d devices, want 8", got)
	}

	// Flags before the subcommand work as well as after it.
	r := run(t, "vfio-manager", []string{"BIND_NVSWITCHES=true"}, append(n.flags, "bind", "--all")...)
	if r.code != 0 {
		t.Fatalf("bind --all: %s", r)
	}
	if !strings.Contains(r.stdout, "12 bound") {
		t.Errorf("summary does not say 12 bound: %s", r.stdout)
	}
	for _, e := range n.status(t, "BIND_NVSWITCHES=true") {
		if e.Driver != "vfio-pci" || e.VFIODevice != "/dev/vfio/"+itoa(e.IOMMUGroup) {
			t.Errorf("after bind: %+v", e)
		}
	}
	r = n.vfioManager(t, []string{"BIND_NVSWITCHES=true"}, "bind", "--all")
	if r.code != 0 || !strings.Contains(r.stdout, "12 unchanged") {
		t.Errorf("second bind is not a no-op: %s", r)
	}

	r = run(t, "vfio-manage", []string{"BIND_NVSWITCHES=true"}, append([]string{"unbind", "--all"}, n.flags...)...)
	if r.code != 0 {
		t.Fatalf("vfio-manage unbind --all: %s", r)
	}
	for _, e := range n.status(t, "BIND_NVSWITCHES=true") {
		if e.Driver != "nvidia" || e.VFIODevice != "" {
			t.Errorf("after unbind: %+v", e)
		}
	}
	if _, err := os.Stat(n.tree.GroupNode(20)); err == nil {
		t.Error("/dev/vfio/20 left after unbind")
	}
}

func TestVFIOManagerByDeviceID(t *testing.T) {
	n := newNode(t, vfiotest.A10WithAudio())
	r := n.vfioManager(t, nil, "bind", "--device-id", "65:00.0")
	if r.code != 0 {
		t.Fatalf("bind --device-id: %s", r)
	}
	n.wantDriver(t, "0000:65:00.0", "vfio-pci")
	n.wantDriver(t, "0000:65:00.1", "vfio-pci") // the audio function shares the group
	entries := n.status(t)
	if len(entries) != 2 || entries[1].Role != "companion" {
		t.Errorf("status: %+v", entries)
	}
	if r := n.vfioManager(t, nil, "unbind", "--device-id", "0000:65:00.0"); r.code != 0 {
		t.Fatalf("unbind: %s", r)
	}
	n.wantDriver(t, "0000:65:00.0", "nvidia")
	n.wantDriver(t, "0000:65:00.1", "snd_hda_intel")
}

func TestVFIOManagerUsageErrors(t *testing.T) {
	n := newNode(t, vfiotest.GroupWithNIC())
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"unknown device", []string{"bind", "--device-id", "0000:99:00.0"}, "no such PCI device"},
		{"not NVIDIA", []string{"bind", "--device-id", "0000:18:00.0"}, "--select"},
		{"malformed address", []string{"unbind", "--device-id", "65:00"}, "invalid PCI address"},
		{"neither all nor ids", []string{"bind"}, "--all or --device-id"},
		{"both", []string{"bind", "--all", "--device-id", "0000:65:00.0"}, "--all or --device-id"},
		{"unknown command", []string{"rebind"}, "unknown command"},
		{"bad selector", []string{"status", "--select", "nvidia"}, "invalid selector"},
		{"unknown flag", []string{"status", "--frobnicate"}, "unknown flag"},
		{"bad log format", []string{"status", "--log-format", "xml"}, "log-format"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := n.vfioManager(t, nil, tc.args...)
			if r.code != 2 || !strings.Contains(r.stderr, tc.want) {
				t.Errorf("want exit 2 mentioning %q; got %s", tc.want, r)
			}
		})
	}
	if r := n.vfioManager(t, []string{"BIND_NVSWITCHES=maybe"}, "status"); r.code != 2 || !strings.Contains(r.stderr, "BIND_NVSWITCHES") {
		t.Errorf("bad environment variable: %s", r)
	}
	n.wantDriver(t, "0000:17:00.0", "nvidia")
	n.wantDriver(t, "0000:65:00.0", "nvidia")
}

func TestVFIOManagerNoIOMMU(t *testing.T) {
	n := newNode(t, vfiotest.NoIOMMU())
	r := n.vfioManager(t, nil, "bind", "--all")
	if r.code != 1 || !strings.Contains(r.stderr, "intel_iommu=on") || !strings.Contains(r.stderr, "amd_iommu=on") {
		t.Fatalf("want exit 1 with advice on enabling the IOMMU; got %s", r)
	}
	n.wantDriver(t, "0000:65:00.0", "nvidia")
	n.wantDriver(t, "0000:65:00.1", "snd_hda_intel")
	if r := n.vfioManager(t, nil, "status", "--json"); r.code != 0 || !strings.Contains(r.stdout, `"iommuGroup": -1`) {
		t.Errorf("status on a node without IOMMU: %s", r)
	}
}

func TestVFIOManagerSharedGroupWithNIC(t *testing.T) {
	n := newNode(t, vfiotest.GroupWithNIC())
	r := n.vfioManager(t, nil, "bind", "--all")
	if r.code != 1 {
		t.Fatalf("want exit 1; got %s", r)
	}
	for _, s := range []string{"0000:17:00.0", "0000:18:00.0", "i40e", "not viable"} {
		if !strings.Contains(r.stderr, s) {
			t.Errorf("error does not mention %q: %s", s, r.stderr)
		}
	}
	n.wantDriver(t, "0000:17:00.0", "nvidia")
	n.wantDriver(t, "0000:18:00.0", "i40e")
	n.wantDriver(t, "0000:65:00.0", "vfio-pci")
}

func TestVFIOManagerStuckDevice(t *testing.T) {
	spec := vfiotest.HGXH100()
	for i := range spec.Devices {
		if spec.Devices[i].Address == "0000:ab:00.0" {
			spec.Devices[i].RefuseUnbind = true
		}
	}
	n := newNode(t, spec)
	r := n.vfioManager(t, nil, "bind", "--all", "--timeout", "300ms")
	if r.code != 1 {
		t.Fatalf("want exit 1; got %s", r)
	}
	if !strings.Contains(r.stderr, "0000:ab:00.0") || !strings.Contains(r.stderr, "timed out") {
		t.Errorf("error does not name the stuck device and the timeout: %s", r.stderr)
	}
	if !strings.Contains(r.stderr, "7 bound") || !strings.Contains(r.stderr, "1 failed (0000:ab:00.0)") {
		t.Errorf("summary does not list what was bound and what was not: %s", r.stderr)
	}
	n.wantDriver(t, "0000:ab:00.0", "nvidia")
	n.wantDriver(t, "0000:ba:00.0", "vfio-pci")
}

// Records lost or damaged: the devices are on vfio but nothing says
// vfio-manager put them there, so unbind leaves them; --force takes them,
// with no driver to give them to.
func TestVFIOManagerUnbindWithCorruptState(t *testing.T) {
	n := newNode(t, vfiotest.A10WithAudio())
	if r := n.vfioManager(t, nil, "bind", "--all"); r.code != 0 {
		t.Fatal(r)
	}
	if err := os.WriteFile(filepath.Join(n.state, "0000:65:00.0.json"), []byte("\x00garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(n.state, "0000:65:00.1.json")); err != nil {
		t.Fatal(err)
	}
	r := n.vfioManager(t, nil, "unbind", "--all")
	if r.code != 0 || !strings.Contains(r.stdout, "2 left") {
		t.Fatalf("unbind: %s", r)
	}
	if strings.Count(r.stderr, "level=warning") != 2 || !strings.Contains(r.stderr, "not bound by vfio-manager") {
		t.Errorf("want a warning per device; stderr:\n%s", r.stderr)
	}
	n.wantDriver(t, "0000:65:00.0", "vfio-pci")
	n.wantDriver(t, "0000:65:00.1", "vfio-pci")

	r = n.vfioManager(t, nil, "unbind", "--all", "--force")
	if r.code != 0 || !strings.Contains(r.stderr, "without a driver") {
		t.Fatalf("unbind --force: %s", r)
	}
	n.wantDriver(t, "0000:65:00.0", "")
	n.wantDriver(t, "0000:65:00.1", "")
}

// holdGroup starts a process that holds a node open, as QEMU holds
// /dev/vfio/<group> for as long as the VM runs, and returns it.
func holdGroup(t *testing.T, node string) *exec.Cmd {
	t.Helper()
	f, err := os.Open(node)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close() // the child has its own copy
	cmd := exec.Command("sleep", "600")
	cmd.ExtraFiles = []*os.File{f}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

// startRun starts "vfio-manager run" and waits until it is ready.
func (n *node) startRun(t *testing.T, ready string, args ...string) (*exec.Cmd, *testbed.Output) {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "vfio-manager"), append(append([]string{"run", "--ready-file", ready, "--log-format", "json"}, n.flags...), args...)...)
	cmd.Env = cleanEnv()
	out := &testbed.Output{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { testbed.Stop(cmd) })
	return cmd, out
}

func waitReady(t *testing.T, cmd *exec.Cmd, out *testbed.Output, ready string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for run(t, "vfio-manager", nil, "ready", "--ready-file", ready).code != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("not ready after 10s:\n%s", out.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A DaemonSet rollout while a VM holds a GPU: the old process gets SIGTERM,
// a new one starts. Nothing is unbound, the new process is ready without a
// single write to the kernel, and an unbind of the held group is refused
// naming the VM's process until --force.
func TestVFIOManagerRolloutWithVMHoldingDevice(t *testing.T) {
	n := newNode(t, vfiotest.HGXH100())
	ready := filepath.Join(n.state, "ready")
	cmd, out := n.startRun(t, ready)
	waitReady(t, cmd, out, ready)
	for _, addr := range vfiotest.HGXH100GPUs {
		n.wantDriver(t, addr, "vfio-pci")
	}
	vm := holdGroup(t, n.tree.GroupNode(21)) // 0000:2a:00.0

	records := stateFiles(t, n.state)
	writes := len(n.emu.Writes())
	testbed.Stop(cmd)
	if cmd.ProcessState.ExitCode() != 0 {
		t.Fatalf("run after SIGTERM: exit %d\n%s", cmd.ProcessState.ExitCode(), out.String())
	}
	if run(t, "vfio-manager", nil, "ready", "--ready-file", ready).code == 0 {
		t.Error("ready after the process stopped")
	}
	cmd, out = n.startRun(t, ready)
	waitReady(t, cmd, out, ready)
	for _, addr := range vfiotest.HGXH100GPUs {
		n.wantDriver(t, addr, "vfio-pci")
	}
	if got := n.emu.Writes()[writes:]; len(got) != 0 {
		t.Errorf("the rollout wrote to the kernel: %v", got)
	}
	if got := stateFiles(t, n.state); !maps.Equal(got, records) {
		t.Errorf("state records changed in the rollout:\n%v\nwant\n%v", got, records)
	}

	r := n.vfioManager(t, nil, "unbind", "--device-id", "0000:2a:00.0")
	if r.code != 1 {
		t.Fatalf("unbind of the held device: %s", r)
	}
	for _, want := range []string{fmt.Sprintf("pid %d (sleep)", vm.Process.Pid), "/dev/vfio/21", "in use", "--force"} {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("refusal does not say %q:\n%s", want, r.stderr)
		}
	}
	if got := n.emu.Writes()[writes:]; len(got) != 0 {
		t.Errorf("a refused unbind wrote to the kernel: %v", got)
	}
	n.wantDriver(t, "0000:2a:00.0", "vfio-pci")
	status := n.status(t)
	for _, e := range status {
		if held := e.Address == "0000:2a:00.0"; held != (len(e.InUseBy) == 1) {
			t.Errorf("status of %s: in use by %v", e.Address, e.InUseBy)
		}
	}

	if r := n.vfioManager(t, nil, "unbind", "--device-id", "0000:2a:00.0", "--force"); r.code != 0 {
		t.Fatalf("unbind --force: %s", r)
	}
	n.wantDriver(t, "0000:2a:00.0", "nvidia")
	if _, err := os.Stat(filepath.Join(n.state, "0000:2a:00.0.json")); err == nil {
		t.Error("record kept after the forced unbind")
	}
}

// A marker left by a process that was killed never counts for the next
// one, and a marker from another boot never counts at all.
func TestVFIOManagerReadyMarker(t *testing.T) {
	spec := vfiotest.A10WithAudio()
	spec.Devices = append(spec.Devices, vfiotest.Device{
		Address: "0000:b1:00.0", Vendor: 0x10de, DeviceID: 0x26b9, Class: 0x030200, // L40S that will not let go
		Driver: "nvidia", IOMMUGroup: 70, NUMANode: 1, RefuseUnbind: true,
	})
	n := newNode(t, spec)
	ready := filepath.Join(n.state, "ready")
	cmd, out := n.startRun(t, ready, "--select", "10de:2236")
	waitReady(t, cmd, out, ready)
	cmd.Process.Kill()
	cmd.Wait()
	if _, err := os.Stat(ready); err != nil {
		t.Fatalf("the killed process left no marker to test with: %v", err)
	}

	// The next process also selects the L40S, which cannot be bound: it
	// must never look ready, however fast the probe comes.
	addr := freeAddr(t)
	cmd, out = n.startRun(t, ready, "--timeout", "200ms", "--health-address", addr)
	deadline := time.Now().Add(10 * time.Second)
	var body string
	for !strings.Contains(body, "0000:b1:00.0") {
		if time.Now().After(deadline) {
			t.Fatalf("/readyz never named the failed group: %q\n%s", body, out.String())
		}
		if _, err := os.Stat(ready); err == nil && strings.Contains(out.String(), "msg") {
			t.Fatal("the dead process's marker outlived the new process's start")
		}
		body = httpGet(t, "http://"+addr+"/readyz")
		time.Sleep(10 * time.Millisecond)
	}
	if r := run(t, "vfio-manager", nil, "ready", "--ready-file", ready); r.code != 1 {
		t.Errorf("ready while a group is not bound: %s", r)
	}
	n.wantDriver(t, "0000:65:00.0", "vfio-pci") // the others stay bound
	metrics := httpGet(t, "http://"+addr+"/metrics")
	if !strings.Contains(metrics, `gpu_sandbox_vfio_groups{state="failed"} 1`) || !strings.Contains(metrics, "gpu_sandbox_vfio_ready 0") {
		t.Errorf("metrics do not show the failed group:\n%s", metrics)
	}
	if cmd.ProcessState != nil {
		t.Fatalf("run exited although only one group failed:\n%s", out.String())
	}

	os.WriteFile(ready, []byte("boot_id=00000000-0000-0000-0000-000000000000\npid=1\n"), 0o644)
	if r := run(t, "vfio-manager", nil, "ready", "--ready-file", ready); r.code != 1 || !strings.Contains(r.stderr, "another boot") {
		t.Errorf("a marker from another boot counted: %s", r)
	}
}

// stateFiles maps each file of the state dir to its content and mtime.
func stateFiles(t *testing.T, dir string) map[string]string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, e := range entries {
		if e.Name() == "ready" {
			continue
		}
		info, _ := e.Info()
		b, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		out[e.Name()] = fmt.Sprintf("%s@%d", b, info.ModTime().UnixNano())
	}
	return out
}

func TestVersion(t *testing.T) {
	for _, bin := range []string{"vfio-manager", "vfio-manage", "sandbox-device-plugin"} {
		r := run(t, bin, nil, "--version")
		if r.code != 0 || !strings.Contains(r.stdout, testVersion) {
			t.Errorf("%s --version: %s", bin, r)
		}
	}
}

func itoa(i int) string { return strconv.Itoa(i) }

// The GPU Operator's vfio-manage is called with its own short flags and
// names: -a, -d and --unbind-nvswitches do what --all, --device-id and
// --bind-nvswitches do.
func TestVFIOManageFlags(t *testing.T) {
	n := newNode(t, vfiotest.HGXH100())
	if r := run(t, "vfio-manage", nil, append([]string{"bind", "-d", "0000:18:00.0"}, n.flags...)...); r.code != 0 {
		t.Fatalf("bind -d: %s", r)
	}
	n.wantDriver(t, "0000:18:00.0", "vfio-pci")
	n.wantDriver(t, "0000:2a:00.0", "nvidia")
	if r := run(t, "vfio-manage", []string{"BIND_NVSWITCHES=true"}, append([]string{"bind", "-a"}, n.flags...)...); r.code != 0 || !strings.Contains(r.stdout, "11 bound") {
		t.Fatalf("bind -a: %s", r)
	}
	r := run(t, "vfio-manage", nil, append([]string{"unbind", "-a", "--unbind-nvswitches"}, n.flags...)...)
	if r.code != 0 || !strings.Contains(r.stdout, "12 unbound") {
		t.Fatalf("unbind -a --unbind-nvswitches: %s", r)
	}
	n.wantDriver(t, "0000:05:00.0", "nvidia")
}
