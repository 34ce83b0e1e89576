package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	"sigs.k8s.io/yaml"

	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/deviceplugin/deviceplugintest"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
	"github.com/gpu-sandbox/gpu-sandbox/test/e2e/testbed"
)

// operand is one of the GPU Operator's DaemonSets (testdata/operator) run
// with our image: its ConfigMaps, and where each host path it mounts is on
// the fake node.
type operand struct {
	agent  string
	ds     *appsv1.DaemonSet
	data   map[string]map[string]string // ConfigMap name → key → content
	rootfs string
	host   map[string]string
}

// loadOperand reads a rendered DaemonSet and its ConfigMaps, replacing
// REGISTRY in them.
func loadOperand(t *testing.T, agent, registry string) *operand {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "operator", agent+".yaml"))
	if err != nil {
		t.Fatal(err)
	}
	o := &operand{agent: agent, data: map[string]map[string]string{}, rootfs: imageRootfs(t, agent), host: map[string]string{}}
	for _, doc := range strings.Split(strings.ReplaceAll(string(b), "REGISTRY", registry), "\n---\n") {
		var meta struct{ Kind string }
		if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
			t.Fatal(err)
		}
		switch meta.Kind {
		case "DaemonSet":
			o.ds = &appsv1.DaemonSet{}
			err = yaml.UnmarshalStrict([]byte(doc), o.ds)
		case "ConfigMap":
			var cm corev1.ConfigMap
			err = yaml.UnmarshalStrict([]byte(doc), &cm)
			o.data[cm.Name] = cm.Data
		}
		if err != nil {
			t.Fatalf("%s: %v", agent, err)
		}
	}
	return o
}

// run runs argv (a command, probe or hook of container c; nil for the
// image's entrypoint) as the container would: in a mount namespace of its
// own, chrooted into the image, with the container's mounts and
// environment, /proc, and the fake node's /sys as every container's /sys.
func (o *operand) run(t *testing.T, c corev1.Container, argv []string) *exec.Cmd {
	t.Helper()
	if argv == nil {
		argv = []string{"/usr/bin/" + o.agent} // the image's entrypoint
	}
	volumes := map[string]corev1.Volume{}
	for _, v := range o.ds.Spec.Template.Spec.Volumes {
		volumes[v.Name] = v
	}
	mount := func(src, target string, file bool) string {
		target = filepath.Join(o.rootfs, target)
		if file {
			return fmt.Sprintf("mkdir -p %q && touch %q && mount --bind %q %q\n", filepath.Dir(target), target, src, target)
		}
		return fmt.Sprintf("mkdir -p %q && mount --bind %q %q\n", target, src, target)
	}
	// What a runtime gives every container: /sys, /proc, and a /dev with
	// the usual nodes.
	dev := filepath.Join(o.rootfs, "dev")
	script := "set -e\n" + mount(o.host["/sys"], "/sys", false) +
		fmt.Sprintf("mkdir -p %q && mount -t proc proc %q\n", filepath.Join(o.rootfs, "proc"), filepath.Join(o.rootfs, "proc")) +
		fmt.Sprintf("mkdir -p %[1]q && mount -t tmpfs tmpfs %[1]q\n", dev)
	for _, n := range []string{"null", "zero", "random", "urandom", "full"} {
		script += mount("/dev/"+n, "/dev/"+n, true)
	}
	for _, m := range c.VolumeMounts {
		v := volumes[m.Name]
		var src string
		switch {
		case v.HostPath != nil:
			src = o.host[v.HostPath.Path]
			if src == "" {
				t.Fatalf("%s mounts the host's %s, which the fake node does not have", c.Name, v.HostPath.Path)
			}
		case v.ConfigMap != nil:
			src = t.TempDir()
			for k, content := range o.data[v.ConfigMap.Name] {
				os.WriteFile(filepath.Join(src, k), []byte(content), 0o755)
			}
		default:
			t.Fatalf("volume %s: not a host path or a ConfigMap", m.Name)
		}
		if m.SubPath != "" {
			script += mount(filepath.Join(src, m.SubPath), m.MountPath, true)
		} else {
			script += mount(src, m.MountPath, false)
		}
	}
	env := []string{"PATH=/usr/bin:/bin"}
	for _, e := range c.Env {
		env = append(env, e.Name+"="+e.Value)
	}
	script += "exec env -i \"$@\"\n"
	args := append([]string{"--mount", "--propagation", "private", "/bin/sh", "-c", script, "sh"}, env...)
	chroot, err := exec.LookPath("chroot")
	if err != nil {
		t.Fatal(err)
	}
	args = append(args, chroot, o.rootfs)
	cmd := exec.Command("unshare", append(args, argv...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return cmd
}

// start runs the container's main command in the background until the
// test ends, as the kubelet would, and returns its output.
func (o *operand) start(t *testing.T, c corev1.Container) *testbed.Output {
	t.Helper()
	cmd := o.run(t, c, slicesConcat(c.Command, c.Args))
	out := &testbed.Output{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
		if t.Failed() {
			t.Logf("%s:\n%s", c.Name, out.String())
		}
	})
	return out
}

// exec runs a probe or hook to its end and returns its exit code and output.
func (o *operand) exec(t *testing.T, c corev1.Container, argv []string) (int, string) {
	t.Helper()
	cmd := o.run(t, c, argv)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), out.String()
	}
	if err != nil {
		t.Fatalf("%v: %v", argv, err)
	}
	return 0, out.String()
}

func slicesConcat(a, b []string) []string {
	if a == nil && b == nil {
		return nil
	}
	return append(append([]string{}, a...), b...)
}

// imageRootfs builds our images and unpacks the agent's into a directory
// named <agent>-rootfs.
func imageRootfs(t *testing.T, agent string) string {
	t.Helper()
	dir := t.TempDir()
	buildImages(t, filepath.Join(dir, "oci"))
	img := agentImages(t, filepath.Join(dir, "oci"))[agent]
	if img == nil {
		t.Fatalf("no image of %s", agent)
	}
	root := filepath.Join(dir, agent+"-rootfs")
	if err := extract(mutate.Extract(img), root); err != nil {
		t.Fatal(err)
	}
	return root
}

func needRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("running the operator's containers needs mounts and chroot: root (make test runs as root in CI)")
	}
}

// The GPU Operator's vfio-manager DaemonSet with our image: its
// /bin/sh -c "vfio-manage bind --all && while true; ..." binds every GPU
// of the node (no /dev mount, no hostPID, the host's / at /host), and its
// preStop "vfio-manage unbind --all" gives them back.
func TestOperatorVFIOManager(t *testing.T) {
	needRoot(t)
	tree, _ := vfiotest.New(t, vfiotest.HGXH100())
	o := loadOperand(t, "vfio-manager", "")
	o.host = map[string]string{"/sys": tree.SysfsRoot, "/lib/modules": filepath.Join(tree.HostRoot, "lib/modules"), "/": tree.HostRoot}
	c := o.ds.Spec.Template.Spec.Containers[0]
	out := o.start(t, c)
	eventually(t, "every GPU on vfio-pci", func() bool {
		for _, addr := range vfiotest.HGXH100GPUs {
			if tree.Driver(addr) != "vfio-pci" {
				return false
			}
		}
		return true
	})
	eventually(t, "the bind's summary", func() bool { return strings.Contains(out.String(), "8 bound") })
	if _, err := os.Stat(filepath.Join(tree.HostRoot, "run/nvidia/vfio-manager/0000:18:00.0.json")); err != nil {
		t.Errorf("state records are not on the host, where they outlive the container: %v", err)
	}
	if code, msg := o.exec(t, c, c.Lifecycle.PreStop.Exec.Command); code != 0 || !strings.Contains(msg, "8 unbound") {
		t.Fatalf("preStop: exit %d\n%s", code, msg)
	}
	for _, addr := range vfiotest.HGXH100GPUs {
		if d := tree.Driver(addr); d != "nvidia" {
			t.Errorf("%s on %q after the preStop hook", addr, d)
		}
	}
}

// The operator's sandbox device plugin DaemonSet with our image: its init
// containers' sh -c loops end, and the image's entrypoint advertises the
// node's vfio GPUs with /dev/vfio as the only /dev it mounts.
func TestOperatorSandboxDevicePlugin(t *testing.T) {
	needRoot(t)
	tree, _ := vfiotest.New(t, vfiotest.BoundToVFIO(vfiotest.HGXH100()))
	o := loadOperand(t, "sandbox-device-plugin", "")
	validations, cdiRoot, pluginDir := t.TempDir(), t.TempDir(), t.TempDir()
	os.WriteFile(filepath.Join(validations, "workload-type"), []byte("vm-passthrough"), 0o644)
	os.WriteFile(filepath.Join(validations, "vfio-pci-ready"), nil, 0o644)
	o.host = map[string]string{"/sys": tree.SysfsRoot, "/run/nvidia/validations": validations,
		"/var/lib/kubelet/device-plugins": pluginDir, "/dev/vfio": filepath.Join(tree.DevRoot, "vfio"), "/var/run/cdi": cdiRoot}
	for _, ic := range o.ds.Spec.Template.Spec.InitContainers {
		if code, msg := o.exec(t, ic, slicesConcat(ic.Command, ic.Args)); code != 0 {
			t.Fatalf("init container %s: exit %d\n%s", ic.Name, code, msg)
		}
	}
	kubelet := deviceplugintest.Start(t, pluginDir)
	o.start(t, o.ds.Spec.Template.Spec.Containers[0])
	kubelet.WaitForDevices("nvidia.com/GH100_H100_SXM5_80GB", func(l []*pluginapi.Device) bool {
		return len(l) == 8 && deviceplugintest.Health(l, "0000:18:00.0") == pluginapi.Healthy
	})
	if _, err := os.Stat(filepath.Join(cdiRoot, "nvidia.com-pgpu.yaml")); err != nil {
		t.Errorf("no CDI spec in the mounted CDI root: %v", err)
	}
}

// The operator's kata-manager DaemonSet with our image: /bin/sh -c
// /bin/entrypoint.sh (the operator's bash script, mounted over ours) waits
// for the vfio-pci validation and execs k8s-kata-manager, which reads the
// operator's paths (/runtime/config-dir, /runtime/sock-dir, the host at
// /host), registers the runtime in the host's containerd through an
// import that resolves on the host, restarts it, and passes the
// operator's readiness probe.
func TestOperatorKataManager(t *testing.T) {
	needRoot(t)
	reg := testbed.StartRegistry(t, "", "")
	testbed.PushArtifact(t, testbed.Repository(t, reg.Host, "nvidia/cloud-native/kata-gpu-artifacts", "", ""),
		"ubuntu22.04-535", testbed.KataArtifact(80, 4096))
	n := newKataNode(t, "")
	ctd := testbed.StartContainerd(t, n.main, n.socket())
	host := t.TempDir() // the host's / as the container sees it: modprobe, a shell
	os.MkdirAll(filepath.Join(host, "bin"), 0o755)
	os.MkdirAll(filepath.Join(host, "sbin"), 0o755)
	copyFile(t, testbed.Program(t, "busybox"), filepath.Join(host, "bin", "busybox"), 0o755)
	os.Symlink("busybox", filepath.Join(host, "bin", "sh"))
	os.WriteFile(filepath.Join(host, "sbin", "modprobe"), []byte("#!/bin/sh\necho \"$@\" >> /modprobe.log\n"), 0o755)
	validations := t.TempDir()
	o := loadOperand(t, "kata-manager", reg.Host)
	o.host = map[string]string{"/sys": "/sys", "/": host, "/var/run/cdi": n.cdi, "/run/nvidia/validations": validations,
		"/etc/containerd": filepath.Dir(n.main), "/run/containerd": n.dir,
		"/opt/nvidia-gpu-operator/artifacts/runtimeclasses": n.artifacts}
	os.MkdirAll(n.cdi, 0o755)
	os.MkdirAll(n.artifacts, 0o755)
	c := o.ds.Spec.Template.Spec.Containers[0]
	out := o.start(t, c)
	eventually(t, "waiting for the vfio-pci validation", func() bool { return strings.Contains(out.String(), "waiting for vfio-pci") })
	os.WriteFile(filepath.Join(validations, "vfio-pci-ready"), nil, 0o644)
	eventually(t, "the operator's readiness probe passes", func() bool {
		code, _ := o.exec(t, c, c.ReadinessProbe.Exec.Command)
		return code == 0
	})
	if runtimes := criRuntimes(t, ctd.Socket); runtimes["kata-qemu-nvidia-gpu"] == nil {
		t.Errorf("the host's containerd does not serve the runtime class: %v", runtimes)
	}
	if got := ctd.Starts(); got != 2 {
		t.Errorf("containerd started %d times, want one restart", got)
	}
	main, _ := os.ReadFile(n.main)
	if !strings.Contains(string(main), `"gpu-sandbox/runtimes.toml"`) || strings.Contains(string(main), "/runtime/config-dir") {
		t.Errorf("the host's configuration imports a path of the container:\n%s", main)
	}
	if log, _ := os.ReadFile(filepath.Join(host, "modprobe.log")); !strings.Contains(string(log), "vhost_vsock") {
		t.Errorf("the host's modprobe was not run for vhost_vsock: %q", log)
	}
	if !strings.Contains(out.String(), "gpu-node-1") {
		t.Errorf("NODE_NAME not in the log:\n%s", out.String())
	}
}
