package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
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
	Address    string `json:"address"`
	Vendor     string `json:"vendor"`
	Device     string `json:"device"`
	Class      string `json:"class"`
	Name       string `json:"name"`
	Role       string `json:"role"`
	Driver     string `json:"driver"`
	IOMMUGroup int    `json:"iommuGroup"`
	NUMANode   int    `json:"numaNode"`
	VFIODevice string `json:"vfioDevice"`
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

func TestVFIOManagerBindStatusUnbindHGX(t *testing.T) {
	n := newNode(t, vfiotest.HGXH100())
	entries := n.status(t, "BIND_NVSWITCHES=true")
	if len(entries) != 12 {
		t.Fatalf("status lists %d devices, want 8 GPUs and 4 NVSwitches", len(entries))
	}
	want := statusEntry{Address: "0000:05:00.0", Vendor: "10de", Device: "22a3", Class: "0x068000",
		Name: "GH100 [H100 NVSwitch]", Role: "nvswitch", Driver: "nvidia", IOMMUGroup: 40, NUMANode: 0}
	if entries[0] != want {
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
	if r.code != 0 {
		t.Fatalf("unbind: %s", r)
	}
	if strings.Count(r.stderr, "level=warning") != 2 || !strings.Contains(r.stderr, "without a driver") {
		t.Errorf("want a warning per device; stderr:\n%s", r.stderr)
	}
	n.wantDriver(t, "0000:65:00.0", "")
	n.wantDriver(t, "0000:65:00.1", "")
}

func TestVFIOManagerRun(t *testing.T) {
	n := newNode(t, vfiotest.A10WithAudio())
	ready := filepath.Join(t.TempDir(), "ready")
	cmd := exec.Command(filepath.Join(binDir, "vfio-manager"), append([]string{"run", "--ready-file", ready, "--log-format", "json"}, n.flags...)...)
	cmd.Env = cleanEnv()
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(ready); err == nil {
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("not ready after 10s:\n%s", stderr.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
	n.wantDriver(t, "0000:65:00.0", "vfio-pci")
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("run after SIGTERM: %v\n%s", err, stderr.String())
	}
	n.wantDriver(t, "0000:65:00.0", "nvidia")
	n.wantDriver(t, "0000:65:00.1", "snd_hda_intel")
	if _, err := os.Stat(ready); err == nil {
		t.Error("ready file left after shutdown")
	}
	for _, line := range strings.Split(strings.TrimSpace(stderr.String()), "\n") {
		var v map[string]any
		if err := json.Unmarshal([]byte(line), &v); err != nil {
			t.Errorf("--log-format json wrote a non-JSON line: %q", line)
		}
	}
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
