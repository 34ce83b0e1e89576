// Command demo runs gpu-sandbox's main job on a simulated node: a fake HGX
// H100 board whose kernel is emulated, a local registry with sample Kata
// artifacts, Debian's containerd when it is installed (the configuration
// alone otherwise), a kubelet stand-in, and the real agents built from this
// tree. It prints what a cluster administrator would look at, then undoes
// everything.
package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"time"

	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/deviceplugin/deviceplugintest"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
	"github.com/gpu-sandbox/gpu-sandbox/test/e2e/testbed"
)

func main() {
	h, err := testbed.NewHarness("gsd") // a short base: unix sockets live there
	if err == nil {
		d := &demo{Harness: h, start: time.Now(), work: h.Dir}
		err = h.Run(d.run)
		h.Close()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "\ndemo failed: %v\n", err)
		os.Exit(1)
	}
}

const (
	gpuResource      = "nvidia.com/GH100_H100_SXM5_80GB"
	nvswitchResource = "nvidia.com/nvswitch"
	runtimeClass     = "kata-qemu-nvidia-gpu"
)

type demo struct {
	*testbed.Harness
	start time.Time
	work  string
	bin   string
	tree  *vfiotest.Tree
}

func step(format string, args ...any) { fmt.Printf("\n==> "+format+"\n", args...) }
func say(format string, args ...any)  { fmt.Printf("    "+format+"\n", args...) }

func (d *demo) run() error {
	var err error
	step("Building the three agents from this tree")
	d.bin = filepath.Join(d.work, "bin")
	if err := d.build(); err != nil {
		return err
	}

	step("A simulated node: HGX H100 board (8 GPUs on NUMA nodes 0 and 1, 4 NVSwitches), kernel emulated")
	if d.tree, err = vfiotest.Build(filepath.Join(d.work, "node"), vfiotest.HGXH100()); err != nil {
		return err
	}
	emu, err := d.tree.Start()
	if err != nil {
		return err
	}
	d.Cleanup(func() { emu.Close() })
	say("sysfs under %s, /dev under %s", d.tree.SysfsRoot, d.tree.DevRoot)

	step("vfio-manager bind --all: every GPU and NVSwitch to vfio-pci, IOMMU groups in parallel")
	vm := []string{"--sysfs-root", d.tree.SysfsRoot, "--dev-root", d.tree.DevRoot, "--host-root", d.tree.HostRoot,
		"--state-dir", filepath.Join(d.work, "vfio-state"), "--load-modules=false", "--bind-nvswitches"}
	if err := d.show("vfio-manager", append([]string{"bind", "--all"}, vm...)...); err != nil {
		return err
	}
	if err := d.show("vfio-manager", append([]string{"status"}, vm...)...); err != nil {
		return err
	}
	unbound := false
	unbind := func() error {
		unbound = true
		step("vfio-manager unbind --all: every device back to the driver it had")
		return d.show("vfio-manager", append([]string{"unbind", "--all"}, vm...)...)
	}
	d.Cleanup(func() {
		if !unbound {
			unbind()
		}
	})

	step("A local OCI registry with sample Kata artifacts (pushed as oras does: a title per file)")
	reg := testbed.StartRegistry(d, "", "")
	ref := reg.Host + "/nvidia/cloud-native/kata-gpu-artifacts:ubuntu22.04-535"
	files := testbed.KataArtifact(1, 24<<20)
	testbed.PushArtifact(d, testbed.Repository(d, reg.Host, "nvidia/cloud-native/kata-gpu-artifacts", "", ""), "ubuntu22.04-535", files)
	for _, name := range testbed.SortedKeys(files) {
		say("%-40s %6.1f MiB", name, float64(len(files[name]))/(1<<20))
	}

	main := filepath.Join(d.work, "etc/containerd/config.toml")
	dropIn := filepath.Join(d.work, "etc/containerd/conf.d/99-gpu-sandbox.toml")
	socket := filepath.Join(d.work, "containerd.sock")
	original := []byte(testbed.ContainerdBase(d.work))
	os.MkdirAll(filepath.Dir(main), 0o755)
	if err := os.WriteFile(main, original, 0o644); err != nil {
		return err
	}
	restart := "none"
	if _, err := exec.LookPath("containerd"); err == nil && os.Geteuid() == 0 {
		step("containerd (Debian's, as installed here) on a configuration of its own")
		testbed.StartContainerd(d, main, socket)
		restart = "signal"
		say("serving %s; kata-manager will restart it with SIGHUP, as on a node", socket)
	} else {
		step("No containerd here (or not root): kata-manager writes the configuration only")
	}

	step("kata-manager: pull the artifacts, point the Kata configuration at them, register %s", runtimeClass)
	config := filepath.Join(d.work, "kata-manager.yaml")
	artifactsDir := filepath.Join(d.work, "artifacts")
	cdiRoot := filepath.Join(d.work, "cdi")
	os.WriteFile(config, []byte(fmt.Sprintf("artifactsDir: %s\nruntimeClasses:\n- name: %s\n  nodeSelector: {}\n  artifacts:\n    url: %s\n    pullSecret: \"\"\n    plainHTTP: true\n",
		artifactsDir, runtimeClass, ref)), 0o644)
	kmArgs := []string{"--config-file", config, "--containerd-config", main,
		"--containerd-drop-in", dropIn, "--containerd-socket", socket, "--restart-mode", restart,
		"--load-kernel-modules=false", "--cdi-root", cdiRoot}
	km, kmLog, err := d.startAgent("kata-manager", kmArgs...)
	if err != nil {
		return err
	}
	if restart == "signal" {
		if err := waitFile(filepath.Join(artifactsDir, "k8s-kata-manager.pid"), 60*time.Second); err != nil {
			return fmt.Errorf("kata-manager not ready: %w\n%s", err, kmLog)
		}
	} else if err := waitLog(kmLog, "restart containerd", 60*time.Second); err != nil {
		// Without containerd to restart, kata-manager stays unready and says why.
		return fmt.Errorf("kata-manager: %w\n%s", err, kmLog)
	}
	for _, line := range strings.Split(kmLog.String(), "\n") {
		if strings.Contains(line, "msg=\"download") || strings.Contains(line, "pulled") ||
			strings.Contains(line, "written") || strings.Contains(line, "restart") || strings.Contains(line, "ready") {
			say("%s", logMsg(line))
		}
	}
	say("")
	say("containerd runtime entry (%s):", dropIn)
	printRuntime(dropIn, runtimeClass)
	if restart == "signal" {
		out, err := exec.Command("containerd", "--config", main, "config", "dump").Output()
		if err == nil && bytes.Contains(out, []byte("runtimes."+runtimeClass+"]")) {
			say("containerd's own reading of its configuration lists %s (and runc)", runtimeClass)
		}
	}

	step("sandbox-device-plugin: advertise the vfio-bound GPUs to a kubelet stand-in")
	pluginDir := filepath.Join(d.work, "device-plugins")
	os.MkdirAll(pluginDir, 0o750)
	kubelet := deviceplugintest.Start(d, pluginDir)
	plugin, pluginLog, err := d.startAgent("sandbox-device-plugin", "--device-plugin-path", pluginDir,
		"--sysfs-root", d.tree.SysfsRoot, "--dev-root", d.tree.DevRoot, "--cdi-root", cdiRoot)
	// A GPU that reaches the kubelet has its CDI names written first: the
	// device plugin writes every passthrough spec (kata-manager none).
	if err != nil {
		return err
	}
	healthy := func(n int) func([]*pluginapi.Device) bool {
		return func(l []*pluginapi.Device) bool {
			c := 0
			for _, dev := range l {
				if dev.Health == pluginapi.Healthy {
					c++
				}
			}
			return c == n
		}
	}
	gpus := kubelet.WaitForDevices(gpuResource, healthy(8))
	kubelet.WaitForDevices(nvswitchResource, healthy(4))
	say("node capacity as the kubelet sees it:")
	say("  %s: 8", gpuResource)
	say("  %s: 4", nvswitchResource)

	step("CDI specs in %s", cdiRoot)
	cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(cdiRoot), cdiapi.WithAutoRefresh(false))
	if err != nil {
		return err
	}
	entries, _ := os.ReadDir(cdiRoot)
	for _, e := range entries {
		say("%s", filepath.Join(cdiRoot, e.Name()))
	}
	names := cache.ListDevices()
	slices.Sort(names)
	for _, kind := range []string{"nvidia.com/pgpu=", gpuResource + "=", nvswitchResource + "="} {
		var these []string
		for _, n := range names {
			if strings.HasPrefix(n, kind) {
				these = append(these, n)
			}
		}
		if len(these) > 3 {
			these = append(these[:3], fmt.Sprintf("... (%d names)", len(these)))
		}
		say("  %s", strings.Join(these, "  "))
	}

	step("A pod asks for 4 GPUs: the kubelet's preferred allocation, then Allocate")
	ctx := context.Background()
	var ids []string
	for _, dev := range gpus.Devices() {
		ids = append(ids, dev.ID)
	}
	pref, err := gpus.Client.GetPreferredAllocation(ctx, &pluginapi.PreferredAllocationRequest{
		ContainerRequests: []*pluginapi.ContainerPreferredAllocationRequest{{AvailableDeviceIDs: ids, AllocationSize: 4}}})
	if err != nil {
		return err
	}
	chosen := pref.ContainerResponses[0].DeviceIDs
	say("preferred (one NUMA node): %s", strings.Join(chosen, " "))
	resp, err := gpus.Client.Allocate(ctx, &pluginapi.AllocateRequest{
		ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: chosen}}})
	if err != nil {
		return err
	}
	c := resp.ContainerResponses[0]
	for _, dev := range c.Devices {
		say("device  %s (%s)", dev.HostPath, dev.Permissions)
	}
	for k, v := range c.Envs {
		say("env     %s=%s", k, v)
	}
	for _, cd := range c.CdiDevices {
		say("cdi     %s", cd.Name)
	}

	step("A mixed node: the policy goes from 8 GPUs for VMs to 4 while a VM holds two")
	policyFile := filepath.Join(d.work, "vm-gpus")
	if err := os.WriteFile(policyFile, []byte("8\n"), 0o644); err != nil {
		return err
	}
	ready := filepath.Join(d.work, "vfio-state", "ready")
	runArgs := append(slices.Clone(vm), "--vm-gpus-file", policyFile, "--proc-root", d.tree.ProcRoot,
		"--policy-settle", "200ms", "--ready-file", ready)
	mgr, mgrLog, err := d.startAgent("vfio-manager", append([]string{"run"}, runArgs...)...)
	if err != nil {
		return err
	}
	if err := waitFile(ready, 10*time.Second); err != nil {
		return fmt.Errorf("vfio-manager run: %w\n%s", err, mgrLog)
	}
	say("vfio-manager run follows %s (8: every GPU, as bound)", policyFile)
	qemu, err := d.holdGroups(21, 26)
	if err != nil {
		return err
	}
	say("a VM (pid %d) holds /dev/vfio/21 and /dev/vfio/26: GPUs 0000:2a:00.0 and 0000:ba:00.0", qemu.Process.Pid)
	say("$ echo 4 > %s", policyFile)
	if err := os.WriteFile(policyFile, []byte("4\n"), 0o644); err != nil {
		return err
	}
	if err := waitLog(mgrLog, "given back to the host", 10*time.Second); err != nil {
		return fmt.Errorf("vfio-manager run: %w\n%s", err, mgrLog)
	}
	for _, line := range strings.Split(mgrLog.String(), "\n") {
		if strings.Contains(line, "reason=VFIOPolicy ") && strings.Contains(line, "4 of 8") ||
			strings.Contains(line, "reason=VFIOGivenBack") {
			say("%s", logMsg(line))
		}
	}
	if err := d.show("vfio-manager", append([]string{"status"}, runArgs...)...); err != nil {
		return err
	}
	kubelet.WaitForDevices(gpuResource, healthy(4))
	// The NVSwitches went back too: their CDI spec goes once the plugin
	// has seen them leave vfio (its driver-link poll).
	nvswitchSpec := filepath.Join(cdiRoot, "nvidia.com-nvswitch.yaml")
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(nvswitchSpec); os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s still there 10 s after the NVSwitches left vfio", nvswitchSpec)
		}
	}
	say("the device plugin follows: %s: 4 (the held GPUs among them); nvidia keeps the other 4; no NVSwitch, and no NVSwitch CDI spec", gpuResource)

	step("A rollout stops the agents: bindings, runtime classes and CDI specs stay (node state)")
	testbed.Stop(mgr)
	say("vfio-manager stopped: %s", lastLine(mgrLog))
	specs, _ := os.ReadDir(cdiRoot)
	testbed.Stop(plugin)
	say("sandbox-device-plugin stopped: %s", lastLine(pluginLog))
	testbed.Stop(km)
	say("kata-manager stopped: %s", lastLine(kmLog))
	kept, _ := os.ReadDir(cdiRoot)
	stillThere, _ := os.ReadFile(dropIn)
	keptAll := "all"
	if names := func(es []os.DirEntry) (n []string) {
		for _, e := range es {
			n = append(n, e.Name())
		}
		return n
	}; len(kept) == 0 || !slices.Equal(names(kept), names(specs)) {
		keptAll = "not all"
	}
	say("CDI specs kept: %s (%d of %d); %s still registered: %v", keptAll, len(kept), len(specs), runtimeClass, bytes.Contains(stillThere, []byte(runtimeClass)))

	step("Giving the node back, as an administrator does: uninstall, then unbind")
	if err := d.show("kata-manager", append([]string{"uninstall"}, kmArgs...)...); err != nil {
		return err
	}
	if err := d.show("sandbox-device-plugin", "uninstall", "--cdi-root", cdiRoot); err != nil {
		return err
	}
	after, _ := os.ReadFile(main)
	say("containerd configuration given back byte for byte: %v", bytes.Equal(after, original))
	left, _ := os.ReadDir(cdiRoot)
	say("CDI specs left: %d", len(left))
	qemu.Process.Kill()
	qemu.Wait()
	say("the VM has ended")
	if err := unbind(); err != nil {
		return err
	}
	step("Done in %s; the simulated node is removed", time.Since(d.start).Round(100*time.Millisecond))
	return nil
}

func (d *demo) build() error {
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..", "..", "..")
	cmd := exec.Command("go", "build", "-o", d.bin+"/", "./cmd/...")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	return cmd.Run()
}

// show runs an agent to completion and prints its output, indented.
func (d *demo) show(name string, args ...string) error {
	fmt.Printf("    $ %s %s\n", name, strings.Join(args[:min(len(args), 2)], " "))
	out, err := exec.Command(filepath.Join(d.bin, name), append(args, "--log-level", "warn")...).CombinedOutput()
	for _, line := range strings.Split(strings.TrimRight(string(out), "\n"), "\n") {
		say("  %s", line)
	}
	return err
}

// holdGroups starts a process that holds the groups' /dev/vfio nodes open,
// as QEMU does for a Kata VM, visible in the simulated node's proc root.
func (d *demo) holdGroups(groups ...int) (*exec.Cmd, error) {
	cmd := exec.Command("sleep", "600")
	for _, g := range groups {
		f, err := os.Open(d.tree.GroupNode(g))
		if err != nil {
			return nil, err
		}
		defer f.Close() // the child has its own copy
		cmd.ExtraFiles = append(cmd.ExtraFiles, f)
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	d.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd, d.tree.AddProcess(cmd.Process.Pid)
}

// startAgent starts a daemon agent, collecting its log.
func (d *demo) startAgent(name string, args ...string) (*exec.Cmd, *testbed.Output, error) {
	log := &testbed.Output{}
	cmd := exec.Command(filepath.Join(d.bin, name), args...)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	d.Cleanup(func() { testbed.Stop(cmd) })
	return cmd, log, nil
}

func waitLog(log *testbed.Output, text string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for !strings.Contains(log.String(), text) {
		if time.Now().After(deadline) {
			return fmt.Errorf("no %q in the log after %s", text, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}

func waitFile(path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not there after %s", path, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// logMsg is the message of a logrus text line, with the digest or path
// it names.
func logMsg(line string) string {
	m := msgRE.FindStringSubmatch(line)
	if m == nil {
		return line
	}
	msg := strings.Trim(m[1], `"`)
	if f := fieldRE.FindStringSubmatch(line); f != nil {
		msg += "  " + f[0]
	}
	return msg
}

var (
	msgRE   = regexp.MustCompile(`msg=("[^"]*"|\S+)`)
	fieldRE = regexp.MustCompile(`(digest|path|pidFile)=\S+`)
)

func lastLine(b *testbed.Output) string {
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	return logMsg(lines[len(lines)-1])
}

// printRuntime prints the runtime's tables from a containerd TOML file.
func printRuntime(path, name string) {
	f, err := os.Open(path)
	if err != nil {
		say("  (%v)", err)
		return
	}
	defer f.Close()
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "[") {
			in = strings.Contains(line, "runtimes."+name)
		}
		if in && strings.TrimSpace(line) != "" {
			say("  %s", line)
		}
	}
}
