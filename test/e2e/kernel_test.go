package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gpu-sandbox/gpu-sandbox/test/e2e/testbed"
)

// The guest: q35 with an Intel IOMMU, an edu device alone in its group, two
// edu devices behind a PCI bridge (one group with the bridge), the std VGA,
// and no NIC. Addresses as QEMU assigns them.
const (
	eduAlone  = "0000:00:03.0"
	vga       = "0000:00:04.0"
	bridge    = "0000:00:02.0"
	eduBehind = "0000:01:01.0"
	eduMate   = "0000:01:02.0"
)

var qemuDevices = []string{
	"-device", "intel-iommu",
	"-device", "pci-bridge,id=br1,chassis_nr=1,addr=2",
	"-device", "edu,bus=br1,addr=1",
	"-device", "edu,bus=br1,addr=2",
	"-device", "edu,addr=3",
	"-device", "VGA,addr=4",
}

// guest is one boot of the test kernel running a script.
type guest struct {
	console string
	steps   map[string]step
	booted  time.Duration // guest clock when /init started: the kernel's boot
	wall    time.Duration // QEMU start to exit
}

type step struct {
	rc  int
	out string
}

var (
	stepRE   = regexp.MustCompile(`(?s)=== BEGIN (\S+)\r?\n(.*?)=== END (\S+) rc=(\d+)`)
	bootedRE = regexp.MustCompile(`=== BOOTED ([0-9.]+)`)
)

// vmSpec describes one boot of the test kernel.
type vmSpec struct {
	script string
	// bins are copied into the guest's /bin: name → host path. nil: the
	// binaries of the run's binDir the kernel tests use.
	bins map[string]string
	// files are copied into the guest: guest path → host path.
	files map[string]string
	// memMiB is the guest's memory; 0: 512.
	memMiB int
	// timeout bounds the whole boot; 0: 90 s.
	timeout time.Duration
}

// bootGuest boots the test kernel with the kernel tests' binaries and runs
// script.
func bootGuest(t *testing.T, script string) *guest {
	t.Helper()
	return bootVM(t, vmSpec{script: script})
}

// bootVM builds an initramfs with busybox, the kernel's vfio modules, the
// binaries and files, and the script, boots it under QEMU (TCG: KVM is not
// usable on these machines) and returns what each step printed. The kernel
// is the uncompressed vmlinux, booted through QEMU's PVH entry: the
// bzImage's decompressor is most of a TCG boot. It fails, never skips,
// when QEMU or the kernel cannot be had.
func bootVM(t *testing.T, spec vmSpec) *guest {
	t.Helper()
	g, err := bootVMErr(t, spec)
	if err != nil {
		t.Fatalf("qemu: %v", err)
	}
	return g
}

// errGuestTimeout is a guest still running at its spec's timeout.
var errGuestTimeout = errors.New("the guest ran out of time")

// bootVMErr is bootVM returning QEMU's failure, with the console read so
// far; errGuestTimeout when the guest ran out of time.
func bootVMErr(t *testing.T, spec vmSpec) (*guest, error) {
	t.Helper()
	kernel := filepath.Join(repoRoot(), ".cache", "kernel", "current")
	if _, err := os.Stat(filepath.Join(kernel, "vmlinux")); err != nil {
		t.Fatal("the test kernel is missing: run hack/fetch-kernel.sh (make test does)")
	}
	qemu := testbed.Program(t, "qemu-system-x86_64")
	busybox := testbed.Program(t, "busybox")

	root := t.TempDir()
	for _, d := range []string{"bin", "modules", "proc", "sys", "dev", "run", "tmp"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	copyFile(t, busybox, filepath.Join(root, "bin", "busybox"), 0o755)
	modules, _ := filepath.Glob(filepath.Join(kernel, "modules", "*.ko"))
	for _, m := range modules {
		copyFile(t, m, filepath.Join(root, "modules", filepath.Base(m)), 0o644)
	}
	bins := spec.bins
	if bins == nil {
		bins = map[string]string{}
		for _, b := range []string{"vfio-manager", "discover", "vfiouser"} {
			bins[b] = filepath.Join(binDir, b)
		}
	}
	for name, from := range bins {
		copyFile(t, from, filepath.Join(root, "bin", name), 0o755)
	}
	for to, from := range spec.files {
		if err := os.MkdirAll(filepath.Join(root, filepath.Dir(to)), 0o755); err != nil {
			t.Fatal(err)
		}
		copyFile(t, from, filepath.Join(root, to), 0o755)
	}
	init := `#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
echo "=== BOOTED $(cut -d' ' -f1 /proc/uptime)"
for m in irqbypass vfio vfio_iommu_type1 vfio_virqfd vfio-pci-core vfio-pci pci-stub; do
  insmod /modules/$m.ko || echo "insmod $m failed"
done
step() { name=$1; shift; echo "=== BEGIN $name"; "$@" 2>&1; echo "=== END $name rc=$?"; }
drivers() {
  for d in ` + strings.Join([]string{bridge, eduAlone, vga, eduBehind, eduMate}, " ") + `; do
    l=$(readlink /sys/bus/pci/devices/$d/driver); echo "DRV $d ${l##*/}"
  done
  echo "VFIO $(ls /dev/vfio | tr '\n' ' ')"
}
devices() {
  for d in /sys/bus/pci/devices/*; do
    g=$(readlink $d/iommu_group); echo "DEV ${d##*/} $(cat $d/vendor):$(cat $d/device) group=${g##*/} numa=$(cat $d/numa_node)"
  done
}
vm() { vfio-manager --sysfs-root /sys --dev-root /dev --host-root / --state-dir /run/vfio-manager --load-modules=false --log-level warn --timeout 5s "$@"; }
` + spec.script + `
poweroff -f
`
	if err := os.WriteFile(filepath.Join(root, "init"), []byte(init), 0o755); err != nil {
		t.Fatal(err)
	}
	initrd := packInitramfs(t, root)

	timeout, mem := spec.timeout, spec.memMiB
	if timeout == 0 {
		timeout = 90 * time.Second
	}
	if mem == 0 {
		mem = 512
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	// loglevel=3: kernel errors the tests provoke (DMAR faults) go to the
	// kernel log, not into the middle of a step's output on the console.
	args := append([]string{"-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", strconv.Itoa(mem), "-smp", "1",
		"-nic", "none", "-vga", "none", "-nographic", "-no-reboot",
		"-kernel", filepath.Join(kernel, "vmlinux"), "-initrd", initrd,
		"-append", "console=ttyS0 intel_iommu=on panic=-1 quiet loglevel=3"}, qemuDevices...)
	// QEMU's own messages (its VT-d's reports of the faults the tests
	// provoke) stay out of the console the steps are read from.
	var console, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, qemu, args...)
	cmd.Stdout, cmd.Stderr = &console, &stderr
	start := time.Now()
	err := cmd.Run()
	g := &guest{console: console.String(), steps: map[string]step{}, wall: time.Since(start)}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("guest console:\n%s\nQEMU's messages:\n%s", g.console, stderr.String())
		}
	})
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%s): %v", errGuestTimeout, timeout, err)
		}
		return g, err
	}
	if m := bootedRE.FindStringSubmatch(g.console); m != nil {
		secs, _ := strconv.ParseFloat(m[1], 64)
		g.booted = time.Duration(secs * float64(time.Second))
	}
	t.Logf("kernel boot %s (guest clock), QEMU start to exit %s", g.booted.Round(10*time.Millisecond), g.wall.Round(10*time.Millisecond))
	for _, m := range stepRE.FindAllStringSubmatch(g.console, -1) {
		rc, _ := strconv.Atoi(m[4])
		g.steps[m[1]] = step{rc: rc, out: strings.ReplaceAll(m[2], "\r", "")}
	}
	return g, nil
}

// packInitramfs packs the tree at root as a gzipped newc cpio archive.
func packInitramfs(t *testing.T, root string) string {
	t.Helper()
	initrd := filepath.Join(t.TempDir(), "initrd.gz")
	pack := exec.Command("sh", "-c", `find . | "$0" cpio -o -H newc 2>/dev/null | gzip -1 > "$1"`,
		testbed.Program(t, "busybox"), initrd)
	pack.Dir = root
	if out, err := pack.CombinedOutput(); err != nil {
		t.Fatalf("pack initramfs: %v\n%s", err, out)
	}
	return initrd
}

func copyFile(t *testing.T, from, to string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, mode); err != nil {
		t.Fatal(err)
	}
}

func (g *guest) step(t *testing.T, name string, rc int) string {
	t.Helper()
	s, ok := g.steps[name]
	if !ok {
		t.Fatalf("step %s did not run", name)
	}
	if s.rc != rc {
		t.Errorf("step %s: exit %d, want %d:\n%s", name, s.rc, rc, s.out)
	}
	return s.out
}

// drivers parses the DRV and VFIO lines of a step.
func drivers(out string) (map[string]string, []string) {
	drv := map[string]string{}
	var nodes []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 2 && f[0] == "DRV":
			drv[f[1]] = strings.Join(f[2:], "")
		case len(f) >= 1 && f[0] == "VFIO":
			nodes = f[1:]
		}
	}
	return drv, nodes
}

func TestRealKernelVFIO(t *testing.T) {
	const sel = "--select=1234:11e8,1234:1111"
	g := bootGuest(t, fmt.Sprintf(`
step devices devices
step status-before vm status --json %[1]s
step bind-one vm bind --device-id %[2]s %[1]s
step after-bind-one drivers
step bind-one-again vm bind --device-id %[2]s %[1]s
step stub-mate sh -c 'echo pci-stub > /sys/bus/pci/devices/%[4]s/driver_override && echo %[4]s > /sys/bus/pci/drivers_probe'
step not-viable vm bind --device-id %[3]s %[1]s
step after-not-viable drivers
step unstub-mate sh -c 'echo > /sys/bus/pci/devices/%[4]s/driver_override && echo %[4]s > /sys/bus/pci/drivers/pci-stub/unbind'
step stub-vga sh -c 'echo pci-stub > /sys/bus/pci/devices/%[5]s/driver_override && echo %[5]s > /sys/bus/pci/drivers_probe && echo > /sys/bus/pci/devices/%[5]s/driver_override'
step bind-all vm bind --all %[1]s
step after-bind-all drivers
step status-bound vm status --json %[1]s
step discover discover %[1]s
step cdevs sh -c 'for d in /sys/bus/pci/devices/*; do for c in $d/vfio-dev/*; do [ -e "$c/dev" ] && echo "CDEV ${d##*/} ${c##*/}"; done; done; true'

step unbind-all vm unbind --all %[1]s
step after-unbind-all drivers
`, sel, eduAlone, eduBehind, eduMate, vga))

	// What the guest kernel reports.
	groups := map[string]string{}
	for _, line := range strings.Split(g.step(t, "devices", 0), "\n") {
		if f := strings.Fields(line); len(f) == 5 && f[0] == "DEV" {
			groups[f[1]] = strings.TrimPrefix(f[3], "group=")
		}
	}
	if groups[eduBehind] != groups[bridge] || groups[eduMate] != groups[bridge] || groups[eduAlone] == groups[bridge] {
		t.Fatalf("unexpected guest topology: %v", groups)
	}

	var status []statusEntry
	if err := json.Unmarshal([]byte(g.step(t, "status-before", 0)), &status); err != nil {
		t.Fatalf("status --json: %v", err)
	}
	var addrs []string
	for _, e := range status {
		addrs = append(addrs, e.Address)
		if strconv.Itoa(e.IOMMUGroup) != groups[e.Address] || e.NUMANode != -1 || e.Driver != "" {
			t.Errorf("status entry %+v disagrees with the kernel (group %s)", e, groups[e.Address])
		}
	}
	if !slices.Equal(addrs, []string{eduAlone, vga, eduBehind, eduMate}) {
		t.Errorf("status lists %v; want the edu devices and the VGA, not the bridge", addrs)
	}

	drv, nodes := drivers(g.step(t, "after-bind-one", 0))
	if drv[eduAlone] != "vfio-pci" || drv[eduBehind] != "" || !slices.Contains(nodes, groups[eduAlone]) {
		t.Errorf("after bind by address: drivers %v, /dev/vfio %v", drv, nodes)
	}
	if out := g.step(t, "bind-one-again", 0); !strings.Contains(out, "1 unchanged") {
		t.Errorf("second bind is not a no-op:\n%s", out)
	}

	out := g.step(t, "not-viable", 1)
	for _, s := range []string{"not viable", eduBehind, eduMate, "pci-stub"} {
		if !strings.Contains(out, s) {
			t.Errorf("viability error does not mention %q:\n%s", s, out)
		}
	}
	if drv, _ := drivers(g.step(t, "after-not-viable", 0)); drv[eduBehind] != "" || drv[eduMate] != "pci-stub" {
		t.Errorf("a refused group was touched: %v", drv)
	}

	g.step(t, "stub-vga", 0)
	g.step(t, "bind-all", 0)
	drv, nodes = drivers(g.step(t, "after-bind-all", 0))
	for _, d := range []string{eduAlone, vga, eduBehind, eduMate} {
		if drv[d] != "vfio-pci" {
			t.Errorf("after bind --all: %s on %q", d, drv[d])
		}
	}
	if drv[bridge] == "vfio-pci" {
		t.Error("the bridge was bound")
	}
	for _, d := range []string{eduAlone, vga, eduBehind} {
		if !slices.Contains(nodes, groups[d]) {
			t.Errorf("/dev/vfio/%s missing after bind: %v", groups[d], nodes)
		}
	}

	var bound []statusEntry
	json.Unmarshal([]byte(g.step(t, "status-bound", 0)), &bound)
	for _, e := range bound {
		if e.Driver != "vfio-pci" || e.VFIODevice != "/dev/vfio/"+groups[e.Address] {
			t.Errorf("status after bind: %+v", e)
		}
	}

	// Discovery as the device plugin does it, against the kernel's view.
	var found []struct {
		ID        string   `json:"id"`
		Group     int      `json:"group"`
		NUMA      int      `json:"numa"`
		Functions []string `json:"functions"`
		CDevs     []string `json:"cdevs"`
		Ready     bool     `json:"ready"`
	}
	if err := json.Unmarshal([]byte(g.step(t, "discover", 0)), &found); err != nil {
		t.Fatalf("discover: %v", err)
	}
	if len(found) != 3 {
		t.Fatalf("discovered %d devices, want one per group: %+v", len(found), found)
	}
	// A vfio cdev is a vfio-dev entry with a dev attribute (a node can
	// exist for it); Debian's 6.1 lists vfio-dev entries without one.
	cdevs := map[string][]string{}
	for _, line := range strings.Split(g.step(t, "cdevs", 0), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "CDEV" {
			cdevs[f[1]] = append(cdevs[f[1]], f[2])
		}
	}
	for _, d := range found {
		var want []string
		for _, f := range d.Functions {
			want = append(want, cdevs[f]...)
		}
		if strconv.Itoa(d.Group) != groups[d.ID] || d.NUMA != -1 || !d.Ready || !slices.Equal(d.CDevs, want) {
			t.Errorf("discovered %+v; the kernel says group %s, no NUMA node, vfio-dev %v", d, groups[d.ID], want)
		}
		if d.ID == eduBehind && !slices.Equal(d.Functions, []string{eduBehind, eduMate}) {
			t.Errorf("the shared group's functions: %v", d.Functions)
		}
	}

	g.step(t, "unbind-all", 0)
	drv, nodes = drivers(g.step(t, "after-unbind-all", 0))
	if drv[vga] != "pci-stub" {
		t.Errorf("the VGA went back to %q, not the recorded pci-stub", drv[vga])
	}
	for _, d := range []string{eduAlone, eduBehind, eduMate} {
		if drv[d] != "" {
			t.Errorf("%s on %q after unbind; it had no driver", d, drv[d])
		}
	}
	if !slices.Equal(nodes, []string{"vfio"}) {
		t.Errorf("/dev/vfio after unbind: %v", nodes)
	}
}

// A VM holds a group: a VFIO user (the project's vfiouser, doing what QEMU
// does) has the bridged group of two edu devices open, one of which had
// pci-stub before the bind. unbind is refused at once, naming the process,
// and nothing reaches the kernel: both functions stay on vfio-pci and the
// user keeps reading its devices. Once it exits, unbind gives each function
// back to the driver it had and drops the records.
func TestRealKernelVMHoldsGroup(t *testing.T) {
	const sel = "--select=1234:11e8"
	g := bootGuest(t, fmt.Sprintf(`
group=$(basename $(readlink /sys/bus/pci/devices/%[2]s/iommu_group))
step stub-mate sh -c 'echo pci-stub > /sys/bus/pci/devices/%[3]s/driver_override && echo %[3]s > /sys/bus/pci/drivers_probe && echo > /sys/bus/pci/devices/%[3]s/driver_override'
step bind vm bind --device-id %[2]s,%[3]s %[1]s
vfiouser hold /dev/vfio/$group %[2]s %[3]s > /tmp/vm.log 2>&1 &
holder=$!
for i in $(seq 100); do grep -q '^ready' /tmp/vm.log && break; sleep 0.1; done
step holder cat /tmp/vm.log
step unbind-held vm unbind --device-id %[2]s,%[3]s %[1]s
step status-held vm status --json %[1]s
sleep 0.3
step holder-alive sh -c "kill -0 $holder && cat /tmp/vm.log"
step after-refusal drivers
kill $holder; wait $holder
step unbind vm unbind --device-id %[2]s,%[3]s %[1]s
step after-unbind drivers
step records sh -c 'ls /run/vfio-manager | grep -c json; true'
step reopen vfiouser hold /dev/vfio/$group %[2]s
`, sel, eduBehind, eduMate))

	g.step(t, "bind", 0)
	holder := g.step(t, "holder", 0)
	pid := regexp.MustCompile(`ready pid=(\d+)`).FindStringSubmatch(holder)
	if pid == nil || !strings.Contains(holder, "BAR0[0]=0x010000ed") {
		t.Fatalf("the VFIO user did not take the group (edu's identification register is 0x010000ed):\n%s", holder)
	}
	out := g.step(t, "unbind-held", 1)
	for _, want := range []string{"pid " + pid[1] + " (vfiouser)", "in use", "--force"} {
		if !strings.Contains(out, want) {
			t.Errorf("refusal does not say %q:\n%s", want, out)
		}
	}
	var status []statusEntry
	json.Unmarshal([]byte(g.step(t, "status-held", 0)), &status)
	for _, e := range status {
		if (e.Address == eduBehind || e.Address == eduMate) && (len(e.InUseBy) != 1 || !strings.HasPrefix(e.InUseBy[0], pid[1]+" ")) {
			t.Errorf("status of %s while held: in use by %v", e.Address, e.InUseBy)
		}
	}
	if log := g.step(t, "holder-alive", 0); strings.Contains(log, "lost") {
		t.Errorf("the VFIO user lost its device:\n%s", log)
	}
	if drv, _ := drivers(g.step(t, "after-refusal", 0)); drv[eduBehind] != "vfio-pci" || drv[eduMate] != "vfio-pci" {
		t.Errorf("a refused unbind touched the group: %v", drv)
	}

	g.step(t, "unbind", 0)
	drv, _ := drivers(g.step(t, "after-unbind", 0))
	if drv[eduBehind] != "" || drv[eduMate] != "pci-stub" {
		t.Errorf("after unbind: %v; want no driver and pci-stub, as before the bind", drv)
	}
	if n := strings.TrimSpace(g.step(t, "records", 0)); n != "0" {
		t.Errorf("%s state records left after unbind", n)
	}
	if out := g.step(t, "reopen", 1); !strings.Contains(out, "open group") {
		t.Errorf("the group could still be opened after unbind:\n%s", out)
	}
}
