package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gpu-sandbox/gpu-sandbox/test/e2e/testbed"

	oci "github.com/opencontainers/runtime-spec/specs-go"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/deviceplugin/deviceplugintest"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
)

func TestKataManagerPull(t *testing.T) {
	reg := testbed.StartDockerRegistry(t)
	files := testbed.KataArtifact(20, 4<<20)
	ref := reg.Host + "/nvidia/cloud-native/kata-gpu-artifacts:ubuntu22.04-535"
	orasPush(t, ref, files)
	dir := filepath.Join(t.TempDir(), "kata-qemu-nvidia-gpu")

	r := run(t, "kata-manager", nil, "pull", "--plain-http", ref, dir)
	if r.code != 0 {
		t.Fatalf("pull: %s", r)
	}
	checkFiles(t, dir, files)
	if !regexp.MustCompile(`digest: sha256:[0-9a-f]{64}`).MatchString(r.stdout) {
		t.Errorf("no digest printed: %s", r.stdout)
	}
	for name := range files {
		if !strings.Contains(r.stdout, filepath.Join(dir, name)) {
			t.Errorf("file %s not listed: %s", name, r.stdout)
		}
	}
	if !strings.Contains(r.stderr, "download vmlinuz-6.1.62-nvidia-gpu: 4.0 MiB of 4.0 MiB") {
		t.Errorf("no progress line for the kernel:\n%s", r.stderr)
	}

	before := reg.BlobGets()
	r = run(t, "kata-manager", nil, "pull", ref, dir, "--plain-http") // flags after the arguments too
	if r.code != 0 || !strings.Contains(r.stdout, "unchanged") {
		t.Fatalf("second pull: %s", r)
	}
	if n := reg.BlobGets() - before; n != 0 {
		t.Errorf("unchanged pull fetched %d blobs", n)
	}

	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"pull", ref}, 2, "want REF DIR"},
		{[]string{"pull", "--plain-http", "no:such:ref", dir}, 2, "invalid reference"},
		{[]string{"pull", "--plain-http", "--platform", "linux", ref, dir}, 2, "platform"},
		{[]string{"pull", "--plain-http", "127.0.0.1:1/kata:v", dir}, 1, "127.0.0.1:1/kata:v"},
		{[]string{"pull", "--plain-http", reg.Host + "/nvidia/missing:v", dir}, 1, "not found"},
	} {
		if r := run(t, "kata-manager", nil, tc.args...); r.code != tc.code || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("kata-manager %v: want exit %d mentioning %q; got %s", tc.args, tc.code, tc.want, r)
		}
	}
	checkFiles(t, dir, files)
}

// katanode is a node for kata-manager: containerd configuration, artifacts
// and CDI directories, and a config file.
type katanode struct {
	dir, main, dropIn, artifacts, cdi, configFile string
	original                                      []byte
}

func newKataNode(t *testing.T, config string) *katanode {
	dir, err := os.MkdirTemp("", "km") // short: containerd's socket path lives here
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	n := &katanode{dir: dir, main: filepath.Join(dir, "etc/containerd/config.toml"),
		dropIn:    filepath.Join(dir, "etc/containerd/conf.d/99-gpu-sandbox.toml"),
		artifacts: filepath.Join(dir, "artifacts"), cdi: filepath.Join(dir, "cdi"),
		configFile: filepath.Join(dir, "kata-manager/config.yaml")}
	n.original = []byte(testbed.ContainerdBase(dir))
	os.MkdirAll(filepath.Dir(n.main), 0o755)
	os.MkdirAll(filepath.Dir(n.configFile), 0o755)
	if err := os.WriteFile(n.main, n.original, 0o644); err != nil {
		t.Fatal(err)
	}
	n.writeConfig(t, config)
	return n
}

func (n *katanode) writeConfig(t *testing.T, config string) {
	if err := os.WriteFile(n.configFile, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
}

func (n *katanode) socket() string { return filepath.Join(n.dir, "containerd.sock") }

func (n *katanode) args(extra ...string) []string {
	return append([]string{"--config-file", n.configFile, "--artifacts-dir", n.artifacts,
		"--containerd-config", n.main, "--containerd-drop-in", n.dropIn, "--containerd-socket", n.socket(),
		"--restart-mode", "none", "--load-kernel-modules=false", "--cdi-root", n.cdi}, extra...)
}

func classConfig(classes ...string) string {
	var b strings.Builder
	b.WriteString("artifactsDir: /ignored/overridden/by/flag\nruntimeClasses:\n")
	for i := 0; i+1 < len(classes); i += 2 {
		fmt.Fprintf(&b, "- name: %s\n  nodeSelector: {}\n  artifacts:\n    url: %s\n    pullSecret: \"\"\n    plainHTTP: true\n", classes[i], classes[i+1])
	}
	return b.String()
}

func TestKataManagerOnceAndContainerd(t *testing.T) {
	reg := testbed.StartDockerRegistry(t)
	ref := reg.Host + "/nvidia/kata-gpu-artifacts:v1"
	files := testbed.KataArtifact(21, 2<<20)
	orasPush(t, ref, files)
	n := newKataNode(t, classConfig("kata-qemu-nvidia-gpu", ref))

	r := run(t, "kata-manager", nil, n.args("--once")...)
	if r.code != 0 {
		t.Fatalf("--once: %s", r)
	}
	// The main configuration gained only its import.
	main, _ := os.ReadFile(n.main)
	if want := strings.Replace(string(n.original), "version = 2\n", "version = 2\nimports = [\""+n.dropIn+"\"]  # gpu-sandbox\n", 1); string(main) != want {
		t.Errorf("main config:\n%s", main)
	}
	dump := dumpConfig(t, n.main)
	for _, s := range []string{"runtimes.kata-qemu-nvidia-gpu]", "runtimes.runc]", `sandbox_image = "registry.k8s.io/pause:3.9"`} {
		if !strings.Contains(dump, s) {
			t.Errorf("containerd's reading of the config lacks %s", s)
		}
	}

	ctd := testbed.StartContainerd(t, n.main, n.socket())
	runtimes := criRuntimes(t, ctd.Socket)
	kata := runtimes["kata-qemu-nvidia-gpu"]
	if kata == nil || kata["runtimeType"] != "io.containerd.kata-qemu-nvidia-gpu.v2" || runtimes["runc"] == nil {
		t.Fatalf("CRI runtimes: %v", runtimes)
	}
	opts, _ := kata["options"].(map[string]any)
	configPath, _ := opts["ConfigPath"].(string)
	if configPath != filepath.Join(n.artifacts, "kata-qemu-nvidia-gpu", "gpu-sandbox-kata-qemu-nvidia-gpu.toml") {
		t.Errorf("ConfigPath %q", configPath)
	}
	if kata["privileged_without_host_devices"] != true && kata["privilegedWithoutHostDevices"] != true {
		t.Errorf("privileged_without_host_devices not set: %v", kata)
	}
	kataConfig, err := os.ReadFile(configPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"kernel", "initrd"} {
		m := regexp.MustCompile(`(?m)^` + key + ` = "([^"]+)"`).FindSubmatch(kataConfig)
		if m == nil {
			t.Errorf("no %s in %s", key, kataConfig)
			continue
		}
		if _, err := os.Stat(string(m[1])); err != nil || !strings.HasPrefix(string(m[1]), n.artifacts) {
			t.Errorf("%s = %s: not a pulled file (%v)", key, m[1], err)
		}
	}

	// containerd 1.6 does not know enable_cdi (its dump leaves it out); 1.7
	// and 2.x read it from the drop-in.
	if drop, _ := os.ReadFile(n.dropIn); !strings.Contains(string(drop), "enable_cdi = true") {
		t.Errorf("CDI not enabled in the drop-in:\n%s", drop)
	}
	// One writer per CDI spec: the device plugin's (docs/decisions.md).
	if entries, _ := os.ReadDir(n.cdi); len(entries) != 0 {
		t.Errorf("kata-manager wrote CDI specs: %v", entries)
	}

	// --once again changes nothing.
	before, _ := os.ReadFile(n.dropIn)
	if r := run(t, "kata-manager", nil, n.args("--once")...); r.code != 0 {
		t.Fatalf("second --once: %s", r)
	}
	if after, _ := os.ReadFile(n.dropIn); string(after) != string(before) {
		t.Error("second --once rewrote the drop-in")
	}
}

// startKataManager starts the daemon and returns it with its log.
func startKataManager(t *testing.T, args ...string) (*exec.Cmd, *testbed.Output) {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "kata-manager"), args...)
	cmd.Env = cleanEnv()
	logs := &testbed.Output{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		testbed.Stop(cmd)
		if t.Failed() {
			t.Logf("kata-manager:\n%s", logs.String())
		}
	})
	return cmd, logs
}

// A DaemonSet rollout of kata-manager, as the kubelet does it (SIGTERM,
// then a new process), while a pod's devices are handed out: containerd is
// restarted once at the first install and never in the rollout, its
// configuration is not touched, and the CDI names that the device plugin's
// Allocate handed out resolve at every moment. Then the administrator
// uninstalls: the node is back to where it started.
func TestKataManagerRolloutKeepsNodeState(t *testing.T) {
	reg := testbed.StartDockerRegistry(t)
	ref := reg.Host + "/nvidia/kata-gpu-artifacts:v1"
	orasPush(t, ref, testbed.KataArtifact(22, 1<<20))
	n := newKataNode(t, classConfig("kata-qemu-nvidia-gpu", ref))
	ctd := testbed.StartContainerd(t, n.main, n.socket())
	names := allocatedCDINames(t, n.cdi)

	// Resolve the names as a runtime does, as fast as it can, all along.
	var resolveErr error
	stopResolving := make(chan struct{})
	resolved := make(chan int)
	go func() {
		count := 0
		for {
			select {
			case <-stopResolving:
				resolved <- count
				return
			default:
			}
			cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(n.cdi), cdiapi.WithAutoRefresh(false))
			if err == nil {
				_, err = cache.InjectDevices(&oci.Spec{Process: &oci.Process{}, Linux: &oci.Linux{}}, names...)
			}
			if err != nil && resolveErr == nil {
				resolveErr = fmt.Errorf("after %d resolutions: %w", count, err)
			}
			count++
		}
	}()

	addr := freeAddr(t)
	args := n.args("--restart-mode", "signal", "--log-format", "json", "--health-address", addr)
	cmd, _ := startKataManager(t, args...)
	eventually(t, "ready", func() bool { return readyz(addr) == http.StatusOK })
	if got := ctd.Starts(); got != 2 {
		t.Errorf("containerd started %d times at the first install, want 2 (one restart)", got)
	}
	if runtimes := criRuntimes(t, ctd.Socket); runtimes["kata-qemu-nvidia-gpu"] == nil {
		t.Fatalf("runtime not registered after the restart: %v", runtimes)
	}
	installed := nodeState(t, n)

	// The rollout.
	testbed.Stop(cmd)
	if cmd.ProcessState.ExitCode() != 0 {
		t.Fatalf("exit after SIGTERM: %v", cmd.ProcessState)
	}
	if d := diffState(nodeState(t, n), installed); d != "" {
		t.Errorf("SIGTERM changed the node: %s", d)
	}
	cmd, _ = startKataManager(t, args...)
	eventually(t, "the new process ready", func() bool { return readyz(addr) == http.StatusOK })
	if got := ctd.Starts(); got != 2 {
		t.Errorf("the rollout restarted containerd (%d starts, want 2)", got)
	}
	if d := diffState(nodeState(t, n), installed); d != "" {
		t.Errorf("the new process changed the node: %s", d)
	}
	close(stopResolving)
	if count := <-resolved; resolveErr != nil || count < 10 {
		t.Errorf("CDI names during the rollout: %d resolutions, error %v", count, resolveErr)
	}
	if runtimes := criRuntimes(t, ctd.Socket); runtimes["kata-qemu-nvidia-gpu"] == nil {
		t.Fatalf("runtime gone after the rollout: %v", runtimes)
	}

	// Giving the node back, as docs/kata-manager.md says.
	testbed.Stop(cmd)
	if r := run(t, "kata-manager", nil, append([]string{"uninstall"}, args[:len(args)-2]...)...); r.code != 0 {
		t.Fatalf("uninstall: %s", r)
	}
	if got := ctd.Starts(); got != 3 {
		t.Errorf("uninstall: containerd started %d times, want 3 (one restart)", got)
	}
	if main, _ := os.ReadFile(n.main); string(main) != string(n.original) {
		t.Errorf("containerd config not given back byte for byte:\n%s", main)
	}
	for _, gone := range []string{n.dropIn, filepath.Join(n.artifacts, "k8s-kata-manager.pid"), n.main + ".gpu-sandbox.json", n.main + ".gpu-sandbox.bak"} {
		if _, err := os.Stat(gone); err == nil {
			t.Errorf("%s left after uninstall", gone)
		}
	}
	if _, err := os.Stat(filepath.Join(n.artifacts, "kata-qemu-nvidia-gpu", "vmlinuz-6.1.62-nvidia-gpu")); err != nil {
		t.Errorf("artifacts removed without --remove-artifacts: %v", err)
	}
	if runtimes := criRuntimes(t, ctd.Socket); runtimes["kata-qemu-nvidia-gpu"] != nil || runtimes["runc"] == nil {
		t.Errorf("after uninstall containerd serves %v", runtimes)
	}
}

// nodeState is what running pods depend on: containerd's configuration
// files, the Kata configuration and the CDI specs, each with its bytes and
// modification time, and the artifacts by name.
func nodeState(t *testing.T, n *katanode) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, dir := range []string{filepath.Dir(n.main), filepath.Dir(n.dropIn), n.cdi, filepath.Join(n.artifacts, "kata-qemu-nvidia-gpu")} {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			p := filepath.Join(dir, e.Name())
			info, err := os.Stat(p)
			if err != nil || info.IsDir() {
				continue
			}
			sum := "(artifact)"
			if strings.HasSuffix(p, ".toml") || strings.HasSuffix(p, ".yaml") || strings.HasSuffix(p, ".json") {
				b, _ := os.ReadFile(p)
				sum = string(b)
			}
			out[p] = fmt.Sprintf("%s@%d", sum, info.ModTime().UnixNano())
		}
	}
	return out
}

// diffState names the files that differ between two nodeStates.
func diffState(got, want map[string]string) string {
	var d []string
	for p, w := range want {
		if g, ok := got[p]; !ok {
			d = append(d, "gone: "+p)
		} else if g != w {
			d = append(d, fmt.Sprintf("changed: %s\n%s\nwas\n%s", p, g, w))
		}
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			d = append(d, "new: "+p)
		}
	}
	return strings.Join(d, "\n")
}

// allocatedCDINames runs the device plugin on a fake node with its GPUs on
// vfio, lets a kubelet stand-in allocate two GPUs, and returns the CDI
// names the answer carries; the plugin's specs stay in cdiRoot.
func allocatedCDINames(t *testing.T, cdiRoot string) []string {
	t.Helper()
	tree, _ := vfiotest.New(t, vfiotest.BoundToVFIO(vfiotest.HGXH100()))
	pluginDir := t.TempDir()
	kubelet := deviceplugintest.Start(t, pluginDir)
	plugin := exec.Command(filepath.Join(binDir, "sandbox-device-plugin"), "--device-plugin-path", pluginDir,
		"--sysfs-root", tree.SysfsRoot, "--dev-root", tree.DevRoot, "--cdi-root", cdiRoot)
	plugin.Env = append(cleanEnv(), "P_GPU_ALIAS=pgpu")
	if err := plugin.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { testbed.Stop(plugin) })
	p := kubelet.WaitForDevices("nvidia.com/pgpu", func(l []*pluginapi.Device) bool {
		healthy := 0
		for _, d := range l {
			if d.Health == pluginapi.Healthy {
				healthy++
			}
		}
		return healthy == 8
	})
	resp, err := p.Client.Allocate(context.Background(), &pluginapi.AllocateRequest{
		ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: vfiotest.HGXH100GPUs[:2]}}})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, d := range resp.ContainerResponses[0].CdiDevices {
		names = append(names, d.Name)
	}
	if len(names) != 2 {
		t.Fatalf("Allocate named %v", names)
	}
	return names
}

// A restart that cannot happen is a failure, never "nothing to restart":
// no containerd behind the socket, a containerd whose PID the agent cannot
// see (another PID namespace, as without hostPID), or restart mode none
// until the administrator restarts containerd. Each keeps the daemon
// unready, saying why on /readyz, and it becomes ready once a containerd
// that started after the change answers.
func TestKataManagerRestartThatDidNotHappen(t *testing.T) {
	reg := testbed.StartRegistry(t, "", "")
	ref := reg.Host + "/nvidia/kata-gpu-artifacts:v1"
	testbed.PushArtifact(t, testbed.Repository(t, reg.Host, "nvidia/kata-gpu-artifacts", "", ""), "v1", testbed.KataArtifact(24, 4096))

	t.Run("nobody serves the socket", func(t *testing.T) {
		n := newKataNode(t, classConfig("kata-qemu-nvidia-gpu", ref))
		addr := freeAddr(t)
		startKataManager(t, n.args("--restart-mode", "signal", "--health-address", addr)...)
		eventually(t, "/readyz names the socket", func() bool {
			return strings.Contains(httpGet(t, "http://"+addr+"/readyz"), "containerd cannot be reached on \""+n.socket()+"\"")
		})
		if readyz(addr) == http.StatusOK {
			t.Error("ready without containerd")
		}
		ctd := testbed.StartContainerd(t, n.main, n.socket()) // the supervisor starts it, with the configuration
		eventually(t, "ready once containerd answers", func() bool { return readyz(addr) == http.StatusOK })
		if got := ctd.Starts(); got != 1 {
			t.Errorf("containerd started %d times; it had the configuration, no restart was owed", got)
		}
	})

	t.Run("no PID in the peer credentials", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Fatal("a PID namespace needs root (make test runs as root in CI)")
		}
		n := newKataNode(t, classConfig("kata-qemu-nvidia-gpu", ref))
		ctd := testbed.StartContainerd(t, n.main, n.socket())
		r := runInPIDNamespace(t, "kata-manager", n.args("--once", "--restart-mode", "signal")...)
		if r.code != 1 || !strings.Contains(r.stderr, n.socket()) || !strings.Contains(r.stderr, "hostPID") {
			t.Errorf("want exit 1 naming the socket and hostPID; got %s", r)
		}
		if got := ctd.Starts(); got != 1 {
			t.Errorf("containerd restarted %d times", got-1)
		}
	})

	t.Run("restart mode none", func(t *testing.T) {
		n := newKataNode(t, classConfig("kata-qemu-nvidia-gpu", ref))
		ctd := testbed.StartContainerd(t, n.main, n.socket())
		addr := freeAddr(t)
		startKataManager(t, n.args("--restart-mode", "none", "--health-address", addr)...)
		eventually(t, "/readyz says a restart is owed", func() bool {
			return strings.Contains(httpGet(t, "http://"+addr+"/readyz"), "restart mode none: restart containerd")
		})
		if runtimes := criRuntimes(t, ctd.Socket); runtimes["kata-qemu-nvidia-gpu"] != nil {
			t.Fatal("containerd restarted in mode none")
		}
		ctd.Restart(t) // the administrator
		eventually(t, "ready once containerd restarted", func() bool { return readyz(addr) == http.StatusOK })
	})

	t.Run("died between writing and restarting", func(t *testing.T) {
		n := newKataNode(t, classConfig("kata-qemu-nvidia-gpu", ref))
		ctd := testbed.StartContainerd(t, n.main, n.socket())
		// The configuration is written and nobody restarts containerd: what
		// a kata-manager killed right after the write leaves.
		if r := run(t, "kata-manager", nil, n.args("--once")...); r.code != 0 {
			t.Fatal(r)
		}
		if r := run(t, "kata-manager", nil, n.args("--once", "--restart-mode", "signal")...); r.code != 0 {
			t.Fatal(r)
		}
		if runtimes := criRuntimes(t, ctd.Socket); ctd.Starts() != 2 || runtimes["kata-qemu-nvidia-gpu"] == nil {
			t.Errorf("the next kata-manager did not restart containerd once (%d starts): %v", ctd.Starts(), runtimes)
		}
		if r := run(t, "kata-manager", nil, n.args("--once", "--restart-mode", "signal")...); r.code != 0 || ctd.Starts() != 2 {
			t.Errorf("a third run restarted containerd again (%d starts): %s", ctd.Starts(), r)
		}
	})
}

// runInPIDNamespace runs a binary in a PID namespace of its own, where the
// peer credentials of a server outside carry no PID.
func runInPIDNamespace(t *testing.T, name string, args ...string) result {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, name), args...)
	cmd.Env = cleanEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := result{stdout: stdout.String(), stderr: stderr.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run %s in a PID namespace: %v", name, err)
	}
	return r
}

// containerd that does not come back after the restart: the daemon reports
// it, stays unready and keeps checking; once containerd answers (with the
// configuration written before) the daemon is ready without another restart.
func TestKataManagerContainerdNotAnswering(t *testing.T) {
	reg := testbed.StartRegistry(t, "", "")
	ref := reg.Host + "/nvidia/kata-gpu-artifacts:v1"
	testbed.PushArtifact(t, testbed.Repository(t, reg.Host, "nvidia/kata-gpu-artifacts", "", ""), "v1", testbed.KataArtifact(23, 4096))
	n := newKataNode(t, classConfig("kata-qemu-nvidia-gpu", ref))
	ctd := testbed.StartContainerd(t, n.main, n.socket())
	ctd.Hold() // its supervisor will not start it again after the SIGHUP

	cmd := exec.Command(filepath.Join(binDir, "kata-manager"), n.args("--restart-mode", "signal",
		"--restart-timeout", "200ms", "--reconcile-interval", "50ms", "--log-format", "json")...)
	cmd.Env = cleanEnv()
	var logs testbed.Output
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("kata-manager:\n%s", logs.String())
		}
	}()
	notAnswering := func() int { // JSON escapes the quotes around the path
		return strings.Count(logs.String(), `containerd is not answering on \"`+n.socket()+`\"`) +
			strings.Count(logs.String(), `containerd cannot be reached on \"`+n.socket()+`\"`)
	}
	eventually(t, "not answering reported twice", func() bool { return notAnswering() >= 2 })
	pid := filepath.Join(n.artifacts, "k8s-kata-manager.pid")
	if _, err := os.Stat(pid); err == nil {
		t.Error("ready while containerd does not answer")
	}
	starts := ctd.Starts()

	ctd.Release(t)
	eventually(t, "ready once containerd answers", func() bool { _, err := os.Stat(pid); return err == nil })
	if runtimes := criRuntimes(t, ctd.Socket); runtimes["kata-qemu-nvidia-gpu"] == nil {
		t.Errorf("containerd came back without the runtime: %v", runtimes)
	}
	if got := ctd.Starts(); got != starts+1 {
		t.Errorf("containerd started %d times after it came back, want once (no second restart)", got-starts)
	}
	if !strings.Contains(logs.String(), "containerd has loaded the configuration") {
		t.Error("recovery not logged")
	}
}

func TestKataManagerBadInput(t *testing.T) {
	reg := testbed.StartDockerRegistry(t)
	good := reg.Host + "/nvidia/kata-gpu-artifacts:v1"
	orasPush(t, good, testbed.KataArtifact(23, 4096))
	noConfig := reg.Host + "/nvidia/no-config:v1"
	orasPush(t, noConfig, testbed.Files{"vmlinuz-6.1": []byte("kernel"), "rootfs.initrd": []byte("initrd")})

	t.Run("config file", func(t *testing.T) {
		n := newKataNode(t, "")
		for _, tc := range []struct{ config, want string }{
			{classConfig("kata-qemu-nvidia-gpu", good) + "extra: field\n", `unknown field "extra"`},
			{strings.Replace(classConfig("kata-qemu-nvidia-gpu", good), "plainHTTP", "plainHttp", 1), `unknown field "runtimeClasses[0].artifacts.plainHttp"`},
			{classConfig("", good), "runtimeClasses[0].name: empty"},
			{classConfig("kata-qemu-nvidia-gpu", ""), "runtimeClasses[0].artifacts.url: empty"},
			{classConfig("Kata_GPU", good), `runtimeClasses[0].name "Kata_GPU"`},
			{classConfig("a", good, "a", good), `"a": listed twice`},
			{"artifactsDir: [\n", "config file"},
		} {
			n.writeConfig(t, tc.config)
			r := run(t, "kata-manager", nil, n.args("--once")...)
			if r.code != 2 || !strings.Contains(r.stderr, tc.want) {
				t.Errorf("config %q: want exit 2 naming %q; got %s", tc.config, tc.want, r)
			}
		}
		if main, _ := os.ReadFile(n.main); string(main) != string(n.original) {
			t.Error("a bad config file changed containerd's configuration")
		}
	})

	t.Run("the GPU Operator's environment", func(t *testing.T) {
		n := newKataNode(t, classConfig("kata-qemu-nvidia-gpu", good))
		r := run(t, "kata-manager", []string{"RUNTIME=crio"}, n.args("--once")...)
		if r.code != 1 || !strings.Contains(r.stderr, "CRI-O is not supported") {
			t.Errorf("RUNTIME=crio: want exit 1 saying CRI-O is not supported; got %s", r)
		}
		// RUNTIME_CONFIG and RUNTIME_SOCKET stand for CONTAINERD_CONFIG and
		// CONTAINERD_SOCKET, which the operator sets too.
		args := slices.DeleteFunc(n.args("--once"), func(a string) bool { return a == "--containerd-config" || a == n.main })
		r = run(t, "kata-manager", []string{"RUNTIME=containerd", "RUNTIME_CONFIG=" + n.main, "CONTAINERD_RUNTIME_CLASS=nvidia", "NODE_NAME=gpu-node-7"}, args...)
		if r.code != 0 || !strings.Contains(r.stderr, "gpu-node-7") {
			t.Fatalf("with the operator's variables: %s", r)
		}
		if main, _ := os.ReadFile(n.main); !strings.Contains(string(main), "gpu-sandbox") {
			t.Errorf("RUNTIME_CONFIG was not the configuration edited:\n%s", main)
		}
		// No configuration file: NVIDIA's defaults, no runtime classes.
		os.Remove(n.configFile)
		if r := run(t, "kata-manager", nil, n.args("--once")...); r.code != 0 || !strings.Contains(r.stderr, "configuration file not found") {
			t.Errorf("missing configuration file: %s", r)
		}
	})

	t.Run("containerd config not TOML", func(t *testing.T) {
		n := newKataNode(t, classConfig("kata-qemu-nvidia-gpu", good))
		bad := append(n.original, []byte("\n[plugins\n")...)
		os.WriteFile(n.main, bad, 0o644)
		r := run(t, "kata-manager", nil, n.args("--once")...)
		if r.code != 1 || !strings.Contains(r.stderr, n.main) {
			t.Fatalf("want exit 1 naming the file; got %s", r)
		}
		if main, _ := os.ReadFile(n.main); string(main) != string(bad) {
			t.Error("the invalid config was changed")
		}
		if entries, _ := os.ReadDir(n.artifacts); len(entries) != 0 {
			t.Errorf("artifacts pulled although containerd's config is broken: %v", entries)
		}
	})

	t.Run("one class fails, the other is served", func(t *testing.T) {
		n := newKataNode(t, classConfig("kata-qemu-nvidia-gpu", good, "kata-qemu-nvidia-gpu-snp", "127.0.0.1:1/down:v1",
			"kata-qemu-nvidia-gpu-tdx", noConfig))
		r := run(t, "kata-manager", nil, n.args("--once")...)
		if r.code != 1 || !strings.Contains(r.stderr, "runtime class kata-qemu-nvidia-gpu-snp") ||
			!strings.Contains(r.stderr, "runtime class kata-qemu-nvidia-gpu-tdx") || !strings.Contains(r.stderr, "configuration") {
			t.Fatalf("want exit 1 naming both failing classes; got %s", r)
		}
		dump := dumpConfig(t, n.main)
		if !strings.Contains(dump, "runtimes.kata-qemu-nvidia-gpu]") || strings.Contains(dump, "kata-qemu-nvidia-gpu-snp") ||
			strings.Contains(dump, "kata-qemu-nvidia-gpu-tdx") {
			t.Errorf("containerd runtimes:\n%s", dump)
		}
	})
}

// eventually polls cond until it holds, failing the test after 20s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 20s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The daemon repairs drift: a drop-in someone removed, an import someone
// took out. It is ready on /readyz once set up, and --remove-artifacts
// takes the artifacts on the way out.
func TestKataManagerDaemonRepairsDrift(t *testing.T) {
	reg := testbed.StartRegistry(t, "", "")
	ref := reg.Host + "/nvidia/kata-gpu-artifacts:v1"
	testbed.PushArtifact(t, testbed.Repository(t, reg.Host, "nvidia/kata-gpu-artifacts", "", ""), "v1", testbed.KataArtifact(70, 4096))
	n := newKataNode(t, classConfig("kata-qemu-nvidia-gpu", ref))
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	testbed.StartContainerd(t, n.main, n.socket())
	cmd := exec.Command(filepath.Join(binDir, "kata-manager"), n.args("--health-address", addr, "--restart-mode", "signal",
		"--reconcile-interval", "1h", "--cleanup-on-exit", "--remove-artifacts")...)
	cmd.Env = cleanEnv()
	var logs testbed.Output
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
		if t.Failed() {
			t.Logf("kata-manager:\n%s", logs.String())
		}
	}()
	eventually(t, "ready", func() bool { return readyz(addr) == http.StatusOK })
	exists := func(p string) bool { _, err := os.Stat(p); return err == nil }

	os.Remove(n.dropIn)
	eventually(t, "drop-in written again", func() bool { return exists(n.dropIn) })

	os.WriteFile(n.main, n.original, 0o644) // someone restores an old copy
	eventually(t, "import added again", func() bool {
		b, _ := os.ReadFile(n.main)
		return strings.Contains(string(b), n.dropIn)
	})

	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(n.main); string(b) != string(n.original) {
		t.Errorf("containerd config not given back:\n%s", b)
	}
	if exists(filepath.Join(n.artifacts, "kata-qemu-nvidia-gpu")) || exists(filepath.Join(n.artifacts, ".kata-qemu-nvidia-gpu.versions")) {
		t.Error("artifacts left despite --remove-artifacts")
	}
}
