package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
	"github.com/gpu-sandbox/gpu-sandbox/test/e2e/testbed"
)

// mixedNode is a fake node whose vfio-manager follows a policy file, with a
// proc root that holds only the processes a test starts.
type mixedNode struct {
	*node
	policy string // the policy file
	health string // the health address
}

func newMixedNode(t *testing.T, spec vfiotest.Node, initial string, args ...string) (*mixedNode, *testbed.Output) {
	t.Helper()
	n := &mixedNode{node: newNode(t, spec), policy: filepath.Join(t.TempDir(), "vm-gpus"), health: freeAddr(t)}
	n.flags = append(n.flags, "--proc-root", n.tree.ProcRoot, "--vm-gpus-file", n.policy)
	n.set(t, initial)
	_, out := n.startRun(t, filepath.Join(n.state, "ready"), append([]string{
		"--policy-settle", "50ms", "--reconcile-interval", "100ms", "--health-address", n.health,
	}, args...)...)
	return n, out
}

// set writes the policy file as an administrator's editor does: a new file
// renamed into place.
func (n *mixedNode) set(t *testing.T, value string) {
	t.Helper()
	tmp := n.policy + ".tmp"
	if err := os.WriteFile(tmp, []byte("# GPUs for Kata VMs\n"+value+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, n.policy); err != nil {
		t.Fatal(err)
	}
}

// hold starts a process that holds the node open (a VM holding its group,
// a container holding /dev/nvidiaN) and makes it visible in the proc root.
func (n *mixedNode) hold(t *testing.T, node string) *testbedProcess {
	t.Helper()
	cmd := holdGroup(t, node)
	if err := n.tree.AddProcess(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	return &testbedProcess{pid: cmd.Process.Pid, stop: func() { cmd.Process.Kill(); cmd.Wait() }}
}

type testbedProcess struct {
	pid  int
	stop func()
}

// drivers is the driver of each address.
func (n *mixedNode) drivers(addrs []string) []string {
	out := make([]string, len(addrs))
	for i, a := range addrs {
		out[i] = n.tree.Driver(a)
	}
	return out
}

// waitDrivers polls until the GPUs sit on the drivers wanted.
func (n *mixedNode) waitDrivers(t *testing.T, out *testbed.Output, addrs, want []string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !slices.Equal(n.drivers(addrs), want) {
		if time.Now().After(deadline) {
			t.Fatalf("drivers %v, want %v\n%s", n.drivers(addrs), want, out.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitLog polls until the agent's log says all of want.
func waitLog(t *testing.T, out *testbed.Output, want ...string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s := out.String()
		missing := slices.IndexFunc(want, func(w string) bool { return !strings.Contains(s, w) })
		if missing < 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the log never said %q:\n%s", want[missing], s)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitBody polls a page until it says all of want.
func waitBody(t *testing.T, url string, want ...string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		body := httpGet(t, url)
		missing := slices.IndexFunc(want, func(w string) bool { return !strings.Contains(body, w) })
		if missing < 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never said %q:\n%s", url, want[missing], body)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// sides maps a GPU index to "v" (vfio) or "n" (nvidia), for readable wants.
func sides(s string) []string {
	out := make([]string, len(s))
	for i, c := range s {
		out[i] = map[rune]string{'v': "vfio-pci", 'n': "nvidia"}[c]
	}
	return out
}

// writesTo lists the emulator writes since from that concern addr.
func writesTo(n *mixedNode, from int, addr string) []string {
	var out []string
	for _, w := range n.emu.Writes()[from:] {
		if strings.Contains(w, addr) {
			out = append(out, w)
		}
	}
	return out
}

// An HGX node goes from all eight GPUs for VMs to four, then to NUMA node
// 0, while a VM holds two groups: the held GPUs never move, the free ones
// go back to the nvidia driver, a held GPU the policy no longer wants is
// given back the moment its VM lets go, and every step is reported.
func TestVFIOManagerMixedNodeFollowsPolicy(t *testing.T) {
	gpu := vfiotest.HGXH100GPUs
	n, out := newMixedNode(t, vfiotest.HGXH100(), "8")
	n.waitDrivers(t, out, gpu, sides("vvvvvvvv"))
	n.hold(t, n.tree.GroupNode(21))        // a VM with GPU 1
	vm6 := n.hold(t, n.tree.GroupNode(26)) // another with GPU 6
	mark := len(n.emu.Writes())

	n.set(t, "4")
	// The held GPUs 1 and 6 stay; with them, 0 and 2 (NUMA node 0 first).
	n.waitDrivers(t, out, gpu, sides("vvvnnnvn"))
	for _, held := range []string{gpu[1], gpu[6]} {
		if w := writesTo(n, mark, held); len(w) > 0 {
			t.Errorf("a held GPU was written to: %v", w)
		}
	}
	waitLog(t, out, "whole NUMA nodes would move GPUs that VMs hold", "VFIOGivenBack", gpu[3])

	// NUMA node 0 only: GPU 3 comes back to VMs, GPU 6 must go but is held.
	n.set(t, "numa0")
	n.waitDrivers(t, out, gpu, sides("vvvvnnvn"))
	waitLog(t, out, "VFIOHeld", fmt.Sprintf("pid %d (sleep)", vm6.pid), "/dev/vfio/26")
	waitBody(t, "http://"+n.health+"/metrics", `gpu_sandbox_vfio_groups{state="held_to_give_back"} 1`,
		`gpu_sandbox_vfio_groups{state="bound"} 4`)
	entries := n.status(t)
	for _, e := range entries {
		want := map[string]string{gpu[6]: "give back once no process holds it"}[e.Address]
		if e.Pending != want {
			t.Errorf("status of %s: pending %q, want %q", e.Address, e.Pending, want)
		}
	}
	if body := httpGet(t, "http://"+n.health+"/readyz"); !strings.Contains(body, "ok") {
		t.Errorf("not ready while only a give-back waits: %q", body)
	}

	// The VM holding GPU 6 ends: it goes back without another change.
	vm6.stop()
	n.waitDrivers(t, out, gpu, sides("vvvvnnnn"))
	waitLog(t, out, "given back to the host, no longer for VMs: "+gpu[6])
}

// What an administrator gets wrong, and a GPU the host still uses: a
// malformed value changes nothing and says why; a list naming GPUs the node
// lacks applies the rest and names them; a GPU a container holds through
// /dev/nvidiaN is not taken from it; a value flapping faster than the settle
// time moves nothing until it holds still.
func TestVFIOManagerMixedNodeBadInput(t *testing.T) {
	gpu := vfiotest.TwoSocketL40SGPUs
	n, out := newMixedNode(t, vfiotest.TwoSocketL40S(), "2")
	// Two GPUs behind the first PCIe switch.
	n.waitDrivers(t, out, gpu, sides("vvnnnnnn"))

	mark := len(n.emu.Writes())
	n.set(t, "four")
	waitLog(t, out, "invalid GPU policy", `item \"four\"`, n.policy, "nothing changes until it is fixed")
	waitBody(t, "http://"+n.health+"/readyz", "not ready", `"four"`, n.policy)
	if w := n.emu.Writes()[mark:]; len(w) > 0 {
		t.Errorf("a malformed policy changed the node: %v", w)
	}
	if r := n.vfioManager(t, nil, "status"); r.code != 0 || !strings.Contains(r.stdout, `"four"`) {
		t.Errorf("status does not show the bad policy: %s", r)
	}

	// A container uses GPU 2 through the nvidia driver.
	container := n.hold(t, n.tree.NVIDIANode(gpu[2]))
	n.set(t, "gpu0,gpu2,gpu3,gpu11,0000:19:00.0")
	n.waitDrivers(t, out, gpu, sides("vnnvnnnn"))
	waitLog(t, out, "gpu11: no such GPU: the node has 8", "0000:19:00.0: no GPU at this address",
		fmt.Sprintf("pid %d (sleep) holds /dev/nvidia2", container.pid), "VFIOHostDriverBusy")
	if r := run(t, "vfio-manager", nil, "ready", "--ready-file", filepath.Join(n.state, "ready")); r.code == 0 {
		t.Error("ready while a chosen GPU could not be bound")
	}
	container.stop()
	n.waitDrivers(t, out, gpu, sides("vnvvnnnn"))

	// Flapping: none, all, none, ... every 10 ms, then numa1. Only numa1
	// may ever apply: none would give every GPU back, all bind them all.
	mark = len(n.emu.Writes())
	for i := range 10 {
		n.set(t, []string{"none", "all"}[i%2])
		time.Sleep(10 * time.Millisecond)
	}
	n.set(t, "numa1")
	n.waitDrivers(t, out, gpu, sides("nnnnvvvv"))
	for _, w := range n.emu.Writes()[mark:] {
		if strings.Contains(w, "drivers/nvidia/bind") && slices.ContainsFunc(gpu[4:], func(a string) bool { return strings.Contains(w, a) }) {
			t.Errorf("a GPU of numa1 went to the host on the way: %s", w)
		}
	}
}
