package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	cadvisorapi "github.com/google/cadvisor/info/v1"
	oci "github.com/opencontainers/runtime-spec/specs-go"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/klog/v2"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	"k8s.io/kubernetes/pkg/kubelet/cm/containermap"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
	"k8s.io/kubernetes/pkg/kubelet/lifecycle"
	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/deviceplugin"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
	"github.com/gpu-sandbox/gpu-sandbox/test/e2e/testbed"
)

// The kubelet's device manager is wired to /var/lib/kubelet/device-plugins.
// Its test runs in a private mount namespace with a tmpfs over /var/lib, so
// it neither needs nor touches the machine's own kubelet directory.
const inNamespaceEnv = "GPU_SANDBOX_E2E_MOUNT_NS"

// inPrivateMounts reruns the calling test in a private mount namespace and
// reports false in the parent, which should return; in the child, where
// mounts are the test's own, it reports true.
func inPrivateMounts(t *testing.T) bool {
	t.Helper()
	if os.Getenv(inNamespaceEnv) == "" {
		if os.Geteuid() != 0 {
			t.Fatal("this test runs the kubelet's device manager in a private mount namespace and needs root (make test runs as root in CI)")
		}
		cmd := exec.Command("unshare", "--mount", "--propagation", "private", "--",
			os.Args[0], "-test.run", "^"+t.Name()+"$", "-test.count=1", "-test.v")
		cmd.Env = append(os.Environ(), inNamespaceEnv+"=1", binDirEnv+"="+binDir)
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "--- PASS: "+t.Name()) {
			t.Fatalf("%s in a private mount namespace: %v\n%s", t.Name(), err, out)
		}
		return false
	}
	return true
}

// mountTmpfs mounts a tmpfs with options at dir; only in a private mount
// namespace.
func mountTmpfs(t *testing.T, dir, options string) {
	t.Helper()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, options); err != nil {
		t.Fatalf("mount tmpfs on %s: %v", dir, err)
	}
}

type kubelet struct {
	m    *devicemanager.ManagerImpl
	pods []*v1.Pod
}

func startKubelet(t *testing.T) *kubelet {
	t.Helper()
	logger := klog.Background()
	m, err := devicemanager.NewManagerImpl(logger, []cadvisorapi.Node{{Id: 0}, {Id: 1}}, topologymanager.NewFakeManager(logger))
	if err != nil {
		t.Fatal(err)
	}
	k := &kubelet{m: m}
	if err := m.Start(logger, func() []*v1.Pod { return k.pods }, readySources{}, containermap.NewContainerMap(), sets.New[string]()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Stop(logger) })
	return k
}

type readySources struct{}

func (readySources) AddSource(string) {}
func (readySources) AllReady() bool   { return true }

// waitCapacity waits until the manager's allocatable count for each
// resource is as given.
func (k *kubelet) waitCapacity(t *testing.T, want map[string]int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, allocatable, _ := k.m.GetCapacity(klog.Background())
		ok := true
		for r, n := range want {
			q := allocatable[v1.ResourceName(r)]
			if q.Value() != n {
				ok = false
			}
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("allocatable %v, want %v", allocatable, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (k *kubelet) allocate(t *testing.T, name, res string, n int64) *devicemanager.DeviceRunContainerOptions {
	t.Helper()
	c := v1.Container{Name: "cuda", Resources: v1.ResourceRequirements{
		Limits: v1.ResourceList{v1.ResourceName(res): *resource.NewQuantity(n, resource.DecimalSI)}}}
	pod := &v1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, UID: types.UID(name + "-uid")},
		Spec: v1.PodSpec{Containers: []v1.Container{c}}}
	k.pods = append(k.pods, pod)
	ctx := context.Background()
	if err := k.m.Allocate(ctx, pod, &pod.Spec.Containers[0], lifecycle.AddOperation); err != nil {
		t.Fatalf("allocate %d %s: %v", n, res, err)
	}
	opts, err := k.m.GetDeviceRunContainerOptions(ctx, pod, &pod.Spec.Containers[0])
	if err != nil {
		t.Fatal(err)
	}
	return opts
}

// startPlugin runs the sandbox device plugin on the fake node's tree, with
// extra flags; it is stopped at the end of the test.
func startPlugin(t *testing.T, pluginDir string, tree *vfiotest.Tree, cdiRoot string, extra ...string) (*exec.Cmd, *testbed.Output) {
	t.Helper()
	plugin := exec.Command(filepath.Join(binDir, "sandbox-device-plugin"), append([]string{
		"--device-plugin-path", pluginDir, "--sysfs-root", tree.SysfsRoot, "--dev-root", tree.DevRoot,
		"--cdi-root", cdiRoot, "--vfio-mode", "legacy", "--log-format", "json"}, extra...)...)
	plugin.Env = cleanEnv()
	logs := &testbed.Output{}
	plugin.Stderr = logs
	if err := plugin.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		plugin.Process.Signal(syscall.SIGTERM)
		plugin.Wait()
		if t.Failed() {
			t.Logf("plugin logs:\n%s", logs.String())
		}
	})
	return plugin, logs
}

func TestDevicePluginWithKubeletDeviceManager(t *testing.T) {
	if !inPrivateMounts(t) {
		return
	}
	mountTmpfs(t, "/var/lib", "mode=0755")
	const gpu, nvswitch = "nvidia.com/GH100_H100_SXM5_80GB", "nvidia.com/nvswitch"
	pluginDir := "/var/lib/kubelet/device-plugins"
	tree, _ := vfiotest.New(t, vfiotest.BoundToVFIO(vfiotest.HGXH100()))
	cdiRoot := filepath.Join(t.TempDir(), "cdi")
	k := startKubelet(t)

	plugin, _ := startPlugin(t, pluginDir, tree, cdiRoot)

	k.waitCapacity(t, map[string]int64{gpu: 8, nvswitch: 4})

	opts := k.allocate(t, "pod-a", gpu, 2)
	var nodes, cdiNames []string
	for _, d := range opts.Devices {
		nodes = append(nodes, d.PathOnHost)
	}
	for _, d := range opts.CDIDevices {
		cdiNames = append(cdiNames, d.Name)
	}
	env := map[string]string{}
	for _, e := range opts.Envs {
		env[e.Name] = e.Value
	}
	addrs := strings.Split(env["PCI_RESOURCE_NVIDIA_COM_GH100_H100_SXM5_80GB"], ",")
	if len(addrs) != 2 {
		t.Fatalf("env %v", env)
	}
	for _, a := range addrs {
		group := 20 + slices.Index(vfiotest.HGXH100GPUs, a)
		if !slices.Contains(nodes, fmt.Sprintf("/dev/vfio/%d", group)) {
			t.Errorf("allocated %s but device nodes %v lack its group %d", a, nodes, group)
		}
		if !slices.Contains(cdiNames, gpu+"="+a) {
			t.Errorf("allocated %s but CDI devices are %v", a, cdiNames)
		}
	}
	if !slices.Contains(nodes, "/dev/vfio/vfio") || len(nodes) != 3 {
		t.Errorf("device nodes %v", nodes)
	}

	// The runtime's side: the CDI names resolve and edit an OCI spec.
	cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(cdiRoot), cdiapi.WithAutoRefresh(false))
	if err != nil {
		t.Fatal(err)
	}
	spec := &oci.Spec{}
	if _, err := cache.InjectDevices(spec, cdiNames...); err != nil {
		t.Fatalf("inject %v: %v", cdiNames, err)
	}
	if len(spec.Linux.Devices) != 3 {
		t.Errorf("OCI devices after injection: %+v", spec.Linux.Devices)
	}

	// Health reaches the manager: a group node goes, the device is no
	// longer allocatable; it comes back, so does the device.
	free := ""
	for _, a := range vfiotest.HGXH100GPUs {
		if !slices.Contains(addrs, a) {
			free = a
			break
		}
	}
	node := tree.GroupNode(20 + slices.Index(vfiotest.HGXH100GPUs, free))
	if err := os.Rename(node, node+".gone"); err != nil {
		t.Fatal(err)
	}
	k.waitCapacity(t, map[string]int64{gpu: 7})
	if err := os.Rename(node+".gone", node); err != nil {
		t.Fatal(err)
	}
	k.waitCapacity(t, map[string]int64{gpu: 8})

	// A kubelet restart: a new manager wipes the directory and serves a new
	// kubelet.sock; the plugin registers again.
	if err := k.m.Stop(klog.Background()); err != nil {
		t.Fatal(err)
	}
	k2 := startKubelet(t)
	k2.waitCapacity(t, map[string]int64{gpu: 8, nvswitch: 4})
	opts = k2.allocate(t, "pod-b", nvswitch, 4)
	if len(opts.CDIDevices) != 4 || !strings.HasPrefix(opts.CDIDevices[0].Name, nvswitch+"=") {
		t.Errorf("NVSwitch allocation after restart: %+v", opts.CDIDevices)
	}

	// A clean stop removes the plugin's sockets; the CDI specs stay for
	// the names handed out, until the administrator uninstalls.
	plugin.Process.Signal(syscall.SIGTERM)
	if err := plugin.Wait(); err != nil {
		t.Fatalf("plugin exit: %v", err)
	}
	entries, _ := os.ReadDir(pluginDir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "gpu-sandbox-") {
			t.Errorf("socket %s left after SIGTERM", e.Name())
		}
	}
	if specs, _ := os.ReadDir(cdiRoot); len(specs) == 0 {
		t.Error("CDI specs removed by a stop: names handed out no longer resolve")
	}
	if r := run(t, "sandbox-device-plugin", nil, "uninstall", "--cdi-root", cdiRoot); r.code != 0 {
		t.Fatalf("uninstall: %s", r)
	}
	if specs, _ := os.ReadDir(cdiRoot); len(specs) != 0 {
		t.Errorf("CDI specs left after uninstall: %v", specs)
	}
}

// groupIDPlugin stands in for NVIDIA's sandbox device plugin: IOMMU group
// numbers as device IDs, the group's node on Allocate.
type groupIDPlugin struct{}

func (groupIDPlugin) Allocate(_ context.Context, ids []string) (*pluginapi.ContainerAllocateResponse, error) {
	resp := &pluginapi.ContainerAllocateResponse{}
	for _, id := range ids {
		resp.Devices = append(resp.Devices, &pluginapi.DeviceSpec{HostPath: "/dev/vfio/" + id, ContainerPath: "/dev/vfio/" + id, Permissions: "mrw"})
	}
	return resp, nil
}

// An upgrade from NVIDIA's operands: a plugin with IOMMU group numbers as
// IDs assigns a GPU to a pod (a running VM), then ours replaces it on the
// same kubelet. The kubelet's checkpoint holds that GPU under its group
// number, which matches none of our IDs, so the kubelet would offer it
// again: our plugin keeps it Unhealthy, and no second pod ever gets it,
// until the kubelet forgets the first pod.
func TestUpgradeFromGroupIDsKeepsTheVMsGPU(t *testing.T) {
	if !inPrivateMounts(t) {
		return
	}
	mountTmpfs(t, "/var/lib", "mode=0755")
	const gpu = "nvidia.com/GH100_H100_SXM5_80GB"
	pluginDir := "/var/lib/kubelet/device-plugins"
	tree, _ := vfiotest.New(t, vfiotest.BoundToVFIO(vfiotest.HGXH100()))
	k := startKubelet(t)

	// NVIDIA's plugin, and a VM pod given one GPU by group number.
	var devices []deviceplugin.Device
	for i := range vfiotest.HGXH100GPUs {
		devices = append(devices, deviceplugin.Device{ID: strconv.Itoa(20 + i), Healthy: true, NUMANodes: []int{i / 4}})
	}
	old := deviceplugin.New(gpu, groupIDPlugin{}, deviceplugin.WithDir(pluginDir), deviceplugin.WithSocketName("nvidia-gpu.sock"))
	old.SetDevices(devices)
	ctx, stopOld := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- old.Run(ctx) }()
	k.waitCapacity(t, map[string]int64{gpu: 8})
	opts := k.allocate(t, "vm-pod", gpu, 1)
	if len(opts.Devices) != 1 {
		t.Fatalf("the VM pod got %+v", opts.Devices)
	}
	vmNode := opts.Devices[0].PathOnHost // /dev/vfio/<group>
	group, _ := strconv.Atoi(strings.TrimPrefix(vmNode, "/dev/vfio/"))
	vmGPU := vfiotest.HGXH100GPUs[group-20]

	// The DaemonSet's image is swapped: NVIDIA's plugin stops, ours starts.
	stopOld()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	plugin, logs := startPlugin(t, pluginDir, tree, filepath.Join(t.TempDir(), "cdi"))
	k.waitCapacity(t, map[string]int64{gpu: 7})

	// Every GPU the kubelet will give is another one.
	opts = k.allocate(t, "pod-b", gpu, 7)
	for _, d := range opts.CDIDevices {
		if d.Name == gpu+"="+vmGPU {
			t.Errorf("pod-b got %s, which the VM pod holds as group %d", vmGPU, group)
		}
	}
	for _, d := range opts.Devices {
		if d.PathOnHost == vmNode {
			t.Errorf("pod-b got %s, the VM pod's group", vmNode)
		}
	}
	// The VM pod ends; the kubelet forgets it at its next allocation and
	// rewrites the checkpoint: the GPU comes back.
	k.pods = slices.DeleteFunc(k.pods, func(p *v1.Pod) bool { return p.Name == "vm-pod" })
	k.allocate(t, "pod-c", "nvidia.com/nvswitch", 1)
	k.waitCapacity(t, map[string]int64{gpu: 8})

	// Its log named the pod that held the GPU (read once it has exited).
	plugin.Process.Signal(syscall.SIGTERM)
	if err := plugin.Wait(); err != nil {
		t.Fatalf("plugin exit: %v", err)
	}
	if !strings.Contains(logs.String(), "vm-pod-uid") {
		t.Errorf("the plugin's log does not name the pod holding %s", vmGPU)
	}
}
