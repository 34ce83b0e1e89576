package e2e

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/artifacts"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
	"github.com/gpu-sandbox/gpu-sandbox/test/e2e/testbed"
)

var (
	faultBinOnce sync.Once
	faultBin     string
	faultBinErr  error
)

// faultBinaries builds the agents with the faultinject tag: they die with
// SIGKILL at the point GPU_SANDBOX_KILL_AT names.
func faultBinaries(t *testing.T) string {
	faultBinOnce.Do(func() {
		faultBin = filepath.Join(binDir, "faultinject")
		cmd := exec.Command("go", "build", "-tags", "faultinject", "-o", faultBin+"/", "./cmd/...")
		cmd.Dir = repoRoot()
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			faultBinErr = fmt.Errorf("%v\n%s", err, out)
		}
	})
	if faultBinErr != nil {
		t.Fatal(faultBinErr)
	}
	return faultBin
}

// killedAt runs an agent that dies at kill point n; it reports whether it
// was killed there (false: it finished, having fewer points than n).
func killedAt(t *testing.T, n int, bin string, args ...string) bool {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(cleanEnv(), fmt.Sprintf("GPU_SANDBOX_KILL_AT=%d", n))
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			return true
		}
	}
	if err != nil {
		t.Fatalf("%s (kill point %d not reached) failed: %v\n%s", filepath.Base(bin), n, err, out)
	}
	return false
}

// snapshot is what a node holds after kata-manager: files by path, bytes.
type snapshot map[string]string

func takeSnapshot(t *testing.T, n *katanode) snapshot {
	t.Helper()
	s := snapshot{}
	for _, p := range []string{n.main, n.dropIn} {
		b, err := os.ReadFile(p)
		if err == nil {
			s[p] = string(b)
		}
	}
	for _, rc := range []string{"kata-qemu-nvidia-gpu", "kata-qemu-nvidia-gpu-snp"} {
		dir := filepath.Join(n.artifacts, rc)
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			b, _ := os.ReadFile(filepath.Join(dir, e.Name()))
			s[filepath.Join(dir, e.Name())] = string(b)
		}
	}
	// Every file name in the directories written, so that debris shows.
	for _, dir := range []string{filepath.Dir(n.main), filepath.Dir(n.dropIn), n.cdi, n.artifacts} {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			if _, ok := s[filepath.Join(dir, e.Name())]; !ok && !e.IsDir() && e.Type()&os.ModeSymlink == 0 {
				s[filepath.Join(dir, e.Name())] = "(present)"
			}
		}
	}
	return s
}

// checkAfterCrash holds what must be true whatever the kill point: the
// containerd configuration loads, and every artifact directory that is
// visible is whole and matches its digests.
func checkAfterCrash(t *testing.T, n *katanode, point int) {
	t.Helper()
	if out, err := exec.Command(testbed.Program(t, "containerd"), "--config", n.main, "config", "dump").CombinedOutput(); err != nil {
		t.Fatalf("kill point %d: containerd cannot load its configuration: %v\n%s", point, err, out)
	}
	for _, rc := range []string{"kata-qemu-nvidia-gpu", "kata-qemu-nvidia-gpu-snp"} {
		dir := filepath.Join(n.artifacts, rc)
		if _, err := os.Lstat(dir); err != nil {
			continue // not pulled yet
		}
		cur, err := artifacts.Current(dir)
		if err != nil {
			t.Fatalf("kill point %d: %s visible but unreadable: %v", point, rc, err)
		}
		for _, f := range cur.Files {
			b, err := os.ReadFile(filepath.Join(dir, f.Name))
			sum := sha256.Sum256(b)
			if err != nil || "sha256:"+hex.EncodeToString(sum[:]) != f.Digest.String() {
				t.Fatalf("kill point %d: %s/%s is partial or wrong (%v)", point, rc, f.Name, err)
			}
		}
	}
}

// resetNode gives the node directory back the state held in from.
func resetNode(t *testing.T, n *katanode, from string) {
	t.Helper()
	for _, d := range []string{"etc", "artifacts", "cdi"} {
		os.RemoveAll(filepath.Join(n.dir, d))
	}
	if out, err := exec.Command("cp", "-a", from+"/.", n.dir+"/").CombinedOutput(); err != nil {
		t.Fatalf("reset: %v\n%s", err, out)
	}
}

func saveNode(t *testing.T, n *katanode) string {
	t.Helper()
	to := t.TempDir()
	for _, d := range []string{"etc", "artifacts", "cdi"} {
		if _, err := os.Stat(filepath.Join(n.dir, d)); err == nil {
			if out, err := exec.Command("cp", "-a", filepath.Join(n.dir, d), to+"/").CombinedOutput(); err != nil {
				t.Fatalf("save: %v\n%s", err, out)
			}
		}
	}
	return to
}

// agentLife runs kata-manager once on the node; with point > 0 the
// faultinject build dies at that kill point. It reports whether it died.
type agentLife func(t *testing.T, point int) bool

// onceRun is the life of kata-manager --once.
func onceRun(bin string, args []string) agentLife {
	return func(t *testing.T, point int) bool {
		t.Helper()
		if point > 0 {
			return killedAt(t, point, bin, args...)
		}
		if r := run(t, "kata-manager", nil, args...); r.code != 0 {
			t.Fatalf("run: %s", r)
		}
		return false
	}
}

// daemonRun is the life of the daemon: started, ready on /readyz,
// then SIGTERM and its cleanup, as a pod that is deleted.
func daemonRun(bin string, args []string) agentLife {
	return func(t *testing.T, point int) bool {
		t.Helper()
		cmd := exec.Command(filepath.Join(binDir, "kata-manager"))
		cmd.Env = cleanEnv()
		if point > 0 {
			cmd.Path = bin
			cmd.Env = append(cmd.Env, fmt.Sprintf("GPU_SANDBOX_KILL_AT=%d", point))
		}
		addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
		cmd.Args = append([]string{cmd.Path}, append(args, "--health-address", addr)...)
		var out testbed.Output
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		deadline := time.Now().Add(30 * time.Second)
		terminated := false
		for {
			select {
			case err := <-done:
				var ee *exec.ExitError
				if errors.As(err, &ee) {
					if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
						return true
					}
				}
				if err != nil || !terminated {
					t.Fatalf("daemon (kill point %d) ended on its own: %v\n%s", point, err, out.String())
				}
				return false
			case <-time.After(5 * time.Millisecond):
			}
			if !terminated && readyz(addr) == http.StatusOK {
				cmd.Process.Signal(syscall.SIGTERM)
				terminated = true
			}
			if time.Now().After(deadline) {
				cmd.Process.Kill()
				t.Fatalf("daemon (kill point %d) neither ready nor stopped within 30s:\n%s", point, out.String())
			}
		}
	}
}

func readyz(addr string) int {
	resp, err := http.Get("http://" + addr + "/readyz")
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// killEverywhere kills the agent at every point in turn from the saved
// state, checks the node after each kill, and lets one more run converge
// to the bytes of an uninterrupted run. It returns the points survived.
func killEverywhere(t *testing.T, n *katanode, from string, life agentLife) int {
	t.Helper()
	resetNode(t, n, from)
	life(t, 0)
	want := takeSnapshot(t, n)
	points := 0
	for point := 1; ; point++ {
		resetNode(t, n, from)
		if !life(t, point) {
			break
		}
		points++
		checkAfterCrash(t, n, point)
		life(t, 0)
		got := takeSnapshot(t, n)
		for path, b := range want {
			if got[path] != b {
				t.Fatalf("kill point %d: %s differs from an uninterrupted run:\n%s\nwant:\n%s", point, path, got[path], b)
			}
		}
		for path := range got {
			if _, ok := want[path]; !ok {
				t.Fatalf("kill point %d: %s left behind", point, path)
			}
		}
	}
	return points
}

// kata-manager --once killed at every file operation of a first reconcile
// and of an update (a tag moved) never leaves containerd's configuration
// unloadable or a partial artifact visible, and the next run converges to
// the bytes of a run that was not interrupted.
func TestKataManagerCrashConsistency(t *testing.T) {
	bin := filepath.Join(faultBinaries(t), "kata-manager")
	reg := testbed.StartRegistry(t, "", "")
	repo := testbed.Repository(t, reg.Host, "nvidia/kata", "", "")
	testbed.PushArtifact(t, repo, "gpu", testbed.KataArtifact(50, 64<<10))
	testbed.PushArtifact(t, repo, "snp", testbed.KataArtifact(51, 64<<10))
	n := newKataNode(t, classConfig("kata-qemu-nvidia-gpu", reg.Host+"/nvidia/kata:gpu",
		"kata-qemu-nvidia-gpu-snp", reg.Host+"/nvidia/kata:snp"))
	args := n.args("--once")

	fresh := saveNode(t, n)
	first := killEverywhere(t, n, fresh, onceRun(bin, args))

	// An update: the node converged, then one tag moves.
	resetNode(t, n, fresh)
	if r := run(t, "kata-manager", nil, args...); r.code != 0 {
		t.Fatal(r)
	}
	converged := saveNode(t, n)
	testbed.PushArtifact(t, repo, "gpu", testbed.KataArtifact(52, 64<<10))
	update := killEverywhere(t, n, converged, onceRun(bin, args))

	// A runtime class dropped from the configuration: its entry and its
	// artifacts go.
	n.writeConfig(t, classConfig("kata-qemu-nvidia-gpu", reg.Host+"/nvidia/kata:gpu"))
	dropped := killEverywhere(t, n, converged, onceRun(bin, args))

	t.Logf("kill points survived: %d in a first reconcile, %d in an update, %d dropping a class", first, update, dropped)
	if first+update+dropped < 50 {
		t.Errorf("only %d kill points; want at least 50", first+update+dropped)
	}
}

// The daemon killed at every file operation of its first reconcile, of
// becoming ready (containerd restarted) and of its cleanup after SIGTERM
// (--cleanup-on-exit, what uninstall does): the node is never broken, and
// the next start and stop leave it as a life that was not interrupted
// does: containerd's configuration given back byte for byte, no PID file,
// the artifacts kept.
func TestKataManagerDaemonCrashConsistency(t *testing.T) {
	bin := filepath.Join(faultBinaries(t), "kata-manager")
	reg := testbed.StartRegistry(t, "", "")
	repo := testbed.Repository(t, reg.Host, "nvidia/kata", "", "")
	testbed.PushArtifact(t, repo, "gpu", testbed.KataArtifact(53, 64<<10))
	n := newKataNode(t, classConfig("kata-qemu-nvidia-gpu", reg.Host+"/nvidia/kata:gpu"))
	testbed.StartContainerd(t, n.main, n.socket())

	points := killEverywhere(t, n, saveNode(t, n), daemonRun(bin, n.args("--restart-mode", "signal", "--cleanup-on-exit")))
	t.Logf("kill points survived by the daemon: %d", points)
	if points < 15 {
		t.Errorf("only %d kill points in a daemon's life; want its reconcile, readiness and cleanup", points)
	}
	if main, _ := os.ReadFile(n.main); string(main) != string(n.original) {
		t.Errorf("containerd configuration not given back:\n%s", main)
	}
	for _, gone := range []string{n.dropIn, filepath.Join(n.artifacts, "k8s-kata-manager.pid")} {
		if _, err := os.Stat(gone); err == nil {
			t.Errorf("%s left after the daemon stopped", gone)
		}
	}
	if _, err := artifacts.Current(filepath.Join(n.artifacts, "kata-qemu-nvidia-gpu")); err != nil {
		t.Errorf("artifacts not kept: %v", err)
	}
}

// restartKernel starts the node's kernel emulator afresh after a process
// was killed. The kernel takes a sysfs write whole before write returns,
// so a killed writer's last write either happened or did not; the
// emulator reads its pipes a moment later, so a write can still sit there
// unread, and a probe waiting for an unbind keeps waiting. Restarting
// drops them: the write did not happen, as when the kill came first.
func (n *node) restartKernel(t *testing.T) {
	t.Helper()
	if err := n.emu.Close(); err != nil {
		t.Fatalf("kernel emulator: %v", err)
	}
	emu, err := n.tree.Start()
	if err != nil {
		t.Fatal(err)
	}
	n.emu = emu
	t.Cleanup(func() { emu.Close() })
}

// vfio-manager bind --all killed at every step leaves state records that
// agree with sysfs, and the next bind --all and unbind --all finish the job.
func TestVFIOManagerCrashConsistency(t *testing.T) {
	bin := filepath.Join(faultBinaries(t), "vfio-manager")
	points := 0
	for point := 1; ; point++ {
		n := newNode(t, vfiotest.HGXH100())
		args := append([]string{"bind", "--all", "--bind-nvswitches"}, n.flags...)
		if !killedAt(t, point, bin, args...) {
			break
		}
		points++
		n.restartKernel(t)
		// Every record names the driver the device had: nvidia.
		entries, _ := os.ReadDir(n.state)
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), ".") {
				continue // a write that died before its rename: not a record, cleared by the next run
			}
			b, err := os.ReadFile(filepath.Join(n.state, e.Name()))
			if err == nil && !bytes.Contains(b, []byte(`"driver":"nvidia"`)) {
				t.Fatalf("kill point %d: record %s says %s", point, e.Name(), b)
			}

		}
		// A device off nvidia has a record to go back by.
		for _, addr := range append(append([]string(nil), vfiotest.HGXH100GPUs...), vfiotest.HGXH100NVSwitches...) {
			if drv := n.tree.Driver(addr); drv != "nvidia" {
				if _, err := os.Stat(filepath.Join(n.state, addr+".json")); err != nil {
					t.Fatalf("kill point %d: %s is on %q without a record", point, addr, drv)
				}
			}
		}
		if r := n.vfioManager(t, []string{"BIND_NVSWITCHES=true"}, "bind", "--all"); r.code != 0 {
			t.Fatalf("kill point %d: bind --all after the crash: %s", point, r)
		}
		for _, e := range n.status(t, "BIND_NVSWITCHES=true") {
			if e.Driver != "vfio-pci" {
				t.Fatalf("kill point %d: %s on %q after bind --all", point, e.Address, e.Driver)
			}
		}
		if r := n.vfioManager(t, []string{"BIND_NVSWITCHES=true"}, "unbind", "--all"); r.code != 0 {
			t.Fatalf("kill point %d: unbind --all: %s", point, r)
		}
		if left, _ := os.ReadDir(n.state); len(left) != 0 {
			t.Fatalf("kill point %d: %d files left in the state dir after unbind --all", point, len(left))
		}
		for _, e := range n.status(t, "BIND_NVSWITCHES=true") {
			if e.Driver != "nvidia" || n.tree.DriverOverride(e.Address) != "" {
				t.Fatalf("kill point %d: %s on %q (override %q) after unbind --all", point, e.Address, e.Driver, n.tree.DriverOverride(e.Address))
			}
		}
	}
	t.Logf("kill points survived: %d", points)
	if points < 50 {
		t.Errorf("only %d kill points; want at least 50", points)
	}
}
