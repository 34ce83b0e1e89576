//go:build cluster

package e2e

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	oci "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	nodev1 "k8s.io/api/node/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	podresources "k8s.io/kubelet/pkg/apis/podresources/v1"
	"sigs.k8s.io/yaml"
	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"

	"github.com/gpu-sandbox/gpu-sandbox/internal/vfiomanager"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
	"github.com/gpu-sandbox/gpu-sandbox/test/e2e/testbed"
)

const (
	criSocket        = "/run/containerd/containerd.sock"
	cdiDir           = "/var/run/cdi"
	podImage         = "gpu-sandbox.test/clusterpod:e2e" // the sandbox's pause and the GPU consumer
	agentsNS         = "gpu-sandbox"
	overlay          = "test/e2e/testdata/cluster"
	shippedManifests = "deployments/manifests"
	gpuResource      = "nvidia.com/pgpu" // P_GPU_ALIAS in the plugin's DaemonSet
	consumer         = "gpu-consumer"
	// imagesEnv names an OCI layout of the three images (make e2e-cluster
	// passes make images-local's); without it they are built from the
	// binaries under test.
	imagesEnv = "GPU_SANDBOX_E2E_IMAGES"
)

// containerdRelease is the containerd the cluster runs pods on: a 2.x,
// which injects the CDI devices Allocate names (1.6 ignores them).
const containerdRelease = "2.4.2"

// A real single-node Kubernetes (v1.37.2: etcd, API server, controller
// manager, scheduler, kubelet) on containerd 2.4, in namespaces of the
// test's own, runs our manifests as shipped with only an overlay that
// points the agents at a fake node (testdata/cluster). Against it: the
// DaemonSets become Ready, the GPUs are bound, kata-manager registers the
// runtime classes in the cluster's containerd and restarts it once, the
// Node advertises the GPUs and NVSwitches, a pod that asks for GPUs gets
// their nodes through containerd's CDI injection, the kubelet's
// PodResources API names exactly them and each name resolves through the
// node's CDI specs. Each DaemonSet is rolled out while that pod holds its
// devices, then the node is given back as the docs say, and the run
// leaves nothing on the machine.
func TestCluster(t *testing.T) {
	work, child := inClusterNamespaces(t)
	if !child {
		return
	}
	c := &cluster{t: t, kube: kubeBinary(t), dir: filepath.Join(work, "cluster"), start: time.Now()}
	setUpNode(t, work)
	if err := os.MkdirAll(fakeNode, 0o755); err != nil {
		t.Fatal(err)
	}
	tree, err := vfiotest.Build(fakeNode, vfiotest.HGXH100())
	if err != nil {
		t.Fatal(err)
	}
	emu, err := tree.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := emu.Close(); err != nil {
			t.Errorf("vfiotest emulator: %v", err)
		}
	})
	devices := append(slices.Clone(vfiotest.HGXH100GPUs), vfiotest.HGXH100NVSwitches...)
	var groups []int
	for _, addr := range devices {
		groups = append(groups, groupOf(t, tree, addr))
	}
	standInDev(t, work, groups)
	hostRoot(t, tree)
	start := takeClusterState(t, tree, devices)
	c.step("node set up")

	c.pki()
	c.startControlPlane()
	dumped := false
	t.Cleanup(func() { // before the control plane stops
		if t.Failed() && !dumped {
			t.Logf("cluster:\n%s", c.tails(40))
		}
	})
	forwardRegistry(t)
	env := []string{"PATH=" + filepath.Join(repoRoot(), ".cache", "containerd", containerdRelease) + ":/usr/sbin:/usr/bin:/sbin:/bin"}
	ctd := testbed.StartContainerdBinary(t, containerdBinary(t, "2.4"), env, filepath.Join(tree.HostRoot, "etc/containerd/config.toml"), criSocket)
	importImages(t, work)
	c.step("images imported")
	c.startKubelet(criSocket, os.Getenv(clusterCgroupEnv))
	t.Cleanup(func() { // before the kubelet and containerd stop
		if t.Failed() {
			dumped = true
			out, _ := c.kubectlErr("get", "pods,ds", "-A", "-o", "wide")
			events, _ := c.kubectlErr("get", "events", "-A", "--sort-by=.lastTimestamp")
			for _, agent := range agents {
				logs, _ := c.kubectlErr("logs", "-n", agentsNS, "ds/"+agent, "--tail=30")
				out += "\n--- " + agent + " (last 30 lines)\n" + logs
			}
			t.Logf("cluster:\n%s\nevents:\n%s\n%s", out, events, c.tails(40))
		}
	})

	// As the README says: label the node, apply the manifests.
	c.kubectl("label", "node", nodeName, "nvidia.com/gpu.workload.config=vm-passthrough",
		"nvidia.com/gpu.deploy.vfio-manager=true", "nvidia.com/gpu.deploy.sandbox-device-plugin=true",
		"nvidia.com/gpu.deploy.kata-manager=true")
	c.overlayChangesOnlyHostPaths()
	c.kubectl("apply", "-k", overlay)
	// The manifests as shipped pass the API server's own validation.
	c.kubectl("apply", "--dry-run=server", "--validate=strict", "-k", shippedManifests)
	c.waitDaemonSets()
	c.step("DaemonSets Ready")

	for _, addr := range devices {
		if d := tree.Driver(addr); d != "vfio-pci" {
			t.Errorf("%s on %q with vfio-manager ready", addr, d)
		}
	}
	runtimes := criRuntimes(t, criSocket)
	for _, rc := range []string{"kata-qemu-nvidia-gpu", "kata-qemu-nvidia-gpu-snp"} {
		if runtimes[rc] == nil {
			t.Errorf("the cluster's containerd has no runtime %s: %v", rc, slices.Collect(maps.Keys(runtimes)))
		}
	}
	if n := ctd.Starts(); n != 2 {
		t.Errorf("containerd started %d times; kata-manager should restart it once", n)
	}
	if log, _ := os.ReadFile(filepath.Join(tree.HostRoot, "var/log/modprobe.log")); !strings.Contains(string(log), "vhost_vsock") {
		t.Errorf("the node's modprobe was not asked for vhost_vsock: %q", log)
	}
	// containerd 2.4 always injects CDI devices (enable_cdi is gone); it
	// must read the specs where the agents write them.
	if dirs := criCDISpecDirs(t); !slices.Contains(dirs, cdiDir) {
		t.Errorf("the cluster's containerd reads no CDI specs from %s: cdiSpecDirs %v", cdiDir, dirs)
	}
	var rcs nodev1.RuntimeClassList
	c.get(&rcs, "runtimeclass")
	for _, want := range []string{"kata-qemu-nvidia-gpu", "kata-qemu-nvidia-gpu-snp"} {
		if !slices.ContainsFunc(rcs.Items, func(r nodev1.RuntimeClass) bool { return r.Name == want && r.Handler == want }) {
			t.Errorf("RuntimeClass %s missing: %+v", want, rcs.Items)
		}
	}
	c.waitAllocatable(map[string]string{gpuResource: "8", "nvidia.com/nvswitch": "4"})
	var node corev1.Node
	c.get(&node, "node", nodeName)
	if info := node.Status.NodeInfo; info.KubeletVersion != "v1.37.2" || !strings.HasPrefix(info.ContainerRuntimeVersion, "containerd://"+containerdRelease) {
		t.Errorf("the node runs kubelet %s on %s, want v1.37.2 on containerd %s", info.KubeletVersion, info.ContainerRuntimeVersion, containerdRelease)
	}
	c.step("GPUs bound, runtime classes registered, resources allocatable")
	// vfio-manager reads its policy off the Node and reports there, with
	// the manifests' service account and ClusterRole.
	c.waitSplit(8, 0)
	c.waitEvent("VFIOBound")
	c.step("the Node shows the split")

	held := c.startConsumer(tree)
	c.step("consumer running with its GPUs through CDI")

	for _, agent := range agents {
		c.rollout(agent)
		c.checkConsumer(tree, held)
		c.waitAllocatable(map[string]string{gpuResource: "8", "nvidia.com/nvswitch": "4"})
		if n := ctd.Starts(); n != 2 {
			t.Errorf("after the rollout of %s containerd started %d times, want still 2", agent, n)
		}
		c.step("rollout of " + agent + ": consumer untouched")
	}

	c.mixed(tree, held, start)
	c.step("half the GPUs back to containers, the consumer's kept")

	c.giveBack(tree, held, ctd)
	c.step("node given back")
	if diff := start.diff(takeClusterState(t, tree, devices)); diff != "" {
		t.Errorf("the node is not back where it started:\n%s", diff)
	}
}

// criCDISpecDirs is where the cluster's containerd reads CDI specs, as
// crictl info shows it.
func criCDISpecDirs(t *testing.T) []string {
	t.Helper()
	out, err := exec.Command(tool(t, "crictl"), "--config", "/dev/null", "--runtime-endpoint", "unix://"+criSocket, "info").Output()
	if err != nil {
		t.Fatalf("crictl info: %v", err)
	}
	var info struct {
		Config struct {
			CDISpecDirs []string `json:"cdiSpecDirs"`
		} `json:"config"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("crictl info: %v\n%s", err, out)
	}
	return info.Config.CDISpecDirs
}

// groupOf reads a device's IOMMU group from the fake sysfs.
func groupOf(t *testing.T, tree *vfiotest.Tree, addr string) int {
	t.Helper()
	l, err := os.Readlink(filepath.Join(tree.SysfsRoot, "bus/pci/devices", addr, "iommu_group"))
	if err != nil {
		t.Fatal(err)
	}
	g, err := strconv.Atoi(filepath.Base(l))
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// hostRoot completes the fake node's root file system (the agents' host
// root): a shell and a modprobe that records what it is asked, the
// containerd binary and its configuration, the CNI configuration, and the
// namespace's /proc (the processes of this node).
func hostRoot(t *testing.T, tree *vfiotest.Tree) {
	t.Helper()
	h := tree.HostRoot
	for _, d := range []string{"bin", "sbin", "usr/bin", "etc/containerd", "etc/cni/net.d", "proc", "var/log"} {
		if err := os.MkdirAll(filepath.Join(h, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// The node's /dev has what a container whose /dev is the host's
	// needs besides the fake kernel's vfio nodes: runc opens /dev/null,
	// and mounts the pod's /dev/shm on the directory there.
	for _, d := range []string{"shm", "pts", "mqueue"} {
		if err := os.Mkdir(filepath.Join(tree.DevRoot, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for n, num := range map[string][2]uint32{"null": {1, 3}, "zero": {1, 5}, "full": {1, 7}, "random": {1, 8}, "urandom": {1, 9}, "tty": {5, 0}} {
		if err := unix.Mknod(filepath.Join(tree.DevRoot, n), unix.S_IFCHR|0o666, int(unix.Mkdev(num[0], num[1]))); err != nil {
			t.Fatal(err)
		}
	}
	copyFile(t, testbed.Program(t, "busybox"), filepath.Join(h, "bin/busybox"), 0o755)
	os.Symlink("busybox", filepath.Join(h, "bin/sh"))
	// The agents mount the host root read-only; its /var/log, a mount of
	// its own here, stays writable, as a node's /proc and /sys do.
	os.WriteFile(filepath.Join(h, "sbin/modprobe"), []byte("#!/bin/sh\necho \"$@\" >> /var/log/modprobe.log\n"), 0o755)
	// kata-manager checks a configuration with the node's own containerd
	// before it restarts it.
	copyFile(t, containerdBinary(t, "2.4"), filepath.Join(h, "usr/bin/containerd"), 0o755)
	err := os.WriteFile(filepath.Join(h, "etc/containerd/config.toml"), []byte(fmt.Sprintf(`# The cluster node's containerd (2.4), as an administrator wrote it.
version = 3

[grpc]
  address = '%s'

[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = '/var/lib/containerd/opt'
  [plugins.'io.containerd.nri.v1.nri']
    disable = true
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '%s'
  [plugins.'io.containerd.cri.v1.runtime']
    # root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj.
    restrict_oom_score_adj = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['/usr/lib/cni']
      conf_dir = '%s'
`, criSocket, podImage, filepath.Join(h, "etc/cni/net.d"))), 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cni := fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": "gpu-sandbox-e2e",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": %q, "gateway": %q}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "loopback"}
  ]
}
`, podSubnet, nodeIP)
	if err := os.WriteFile(filepath.Join(h, "etc/cni/net.d/10-gpu-sandbox.conflist"), []byte(cni), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("/proc", filepath.Join(h, "proc"), "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", filepath.Join(h, "var/log"), "tmpfs", 0, "mode=0755"); err != nil {
		t.Fatal(err)
	}
}

// forwardRegistry serves a registry with the Kata artifacts of both
// runtime classes on the node's address, where the agents' pods reach it
// (testdata/cluster's ConfigMap names it).
func forwardRegistry(t *testing.T) {
	t.Helper()
	reg := testbed.StartRegistry(t, "", "")
	repo := testbed.Repository(t, reg.Host, "nvidia/cloud-native/kata-gpu-artifacts", "", "")
	testbed.PushArtifact(t, repo, "ubuntu22.04-535", testbed.KataArtifact(90, 4096))
	testbed.PushArtifact(t, repo, "ubuntu22.04-535-snp", testbed.KataArtifact(91, 4096))
	l, err := net.Listen("tcp", nodeIP+":5000")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			in, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer in.Close()
				out, err := net.Dial("tcp", reg.Host)
				if err != nil {
					return
				}
				defer out.Close()
				go io.Copy(out, in)
				io.Copy(in, out)
			}()
		}
	}()
}

// importImages imports our three images, under the names the manifests
// give them, and the pod image into the cluster's containerd with ctr,
// as an administrator loads images on a node without a registry.
func importImages(t *testing.T, work string) {
	t.Helper()
	layoutDir := os.Getenv(imagesEnv)
	if layoutDir == "" {
		layoutDir = filepath.Join(work, "oci")
		buildImages(t, layoutDir)
	} else if !filepath.IsAbs(layoutDir) {
		layoutDir = filepath.Join(repoRoot(), layoutDir)
	}
	refs := map[name.Reference]v1.Image{}
	m := loadManifests(t)
	for agent, img := range agentImages(t, layoutDir) {
		if ds := m.daemonSets[agent]; ds != nil {
			ref, err := name.ParseReference(ds.Spec.Template.Spec.Containers[0].Image)
			if err != nil {
				t.Fatal(err)
			}
			refs[ref] = img
		}
	}
	if len(refs) != len(agents) {
		t.Fatalf("images of %d agents in %s, want %d", len(refs), layoutDir, len(agents))
	}
	ref, _ := name.ParseReference(podImage)
	refs[ref] = podImageOf(t, work)
	archive := filepath.Join(work, "images.tar")
	if err := tarball.MultiRefWriteToFile(archive, refs); err != nil {
		t.Fatal(err)
	}
	ctr := filepath.Join(repoRoot(), ".cache", "containerd", containerdRelease, "ctr")
	if out, err := exec.Command(ctr, "--address", criSocket, "-n", "k8s.io", "images", "import", archive).CombinedOutput(); err != nil {
		t.Fatalf("ctr images import: %v\n%s", err, out)
	}
}

// podImageOf builds the image of test/e2e/cmd/clusterpod: one static
// binary, the sandbox's pause by default.
func podImageOf(t *testing.T, work string) v1.Image {
	t.Helper()
	bin := filepath.Join(work, "clusterpod")
	cmd := exec.Command("go", "build", "-o", bin, "./test/e2e/cmd/clusterpod")
	cmd.Dir = repoRoot()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build clusterpod: %v\n%s", err, out)
	}
	b, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	tw.WriteHeader(&tar.Header{Name: "clusterpod", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(b))})
	tw.Write(b)
	tw.Close()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(buf.Bytes())), nil })
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", "amd64"
	cfg.Config.Entrypoint = []string{"/clusterpod"}
	img, err = mutate.ConfigFile(img, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// overlayChangesOnlyHostPaths checks that testdata/cluster is our
// manifests as shipped, but for the host paths of volumes and the
// kata-manager ConfigMap.
func (c *cluster) overlayChangesOnlyHostPaths() {
	c.t.Helper()
	objects := func(dir string) map[string]map[string]any {
		out := map[string]map[string]any{}
		for _, doc := range strings.Split(c.kubectl("kustomize", dir), "\n---\n") {
			var o map[string]any
			if err := yaml.Unmarshal([]byte(doc), &o); err != nil {
				c.t.Fatal(err)
			}
			meta, _ := o["metadata"].(map[string]any)
			key := fmt.Sprintf("%s/%s", o["kind"], meta["name"])
			if o["kind"] == "ConfigMap" && meta["name"] == "kata-manager-config" {
				continue
			}
			if o["kind"] == "DaemonSet" {
				spec := o["spec"].(map[string]any)["template"].(map[string]any)["spec"].(map[string]any)
				volumes := spec["volumes"].([]any)
				for _, v := range volumes {
					if hp, ok := v.(map[string]any)["hostPath"].(map[string]any); ok {
						hp["path"] = "(host path)"
					}
				}
				// A strategic merge patch puts the volumes it names first.
				slices.SortFunc(volumes, func(a, b any) int {
					return strings.Compare(a.(map[string]any)["name"].(string), b.(map[string]any)["name"].(string))
				})
			}
			out[key] = o
		}
		return out
	}
	shipped, test := objects(shippedManifests), objects(overlay)
	if len(shipped) != len(test) {
		c.t.Errorf("the overlay has %d objects, the manifests %d", len(test), len(shipped))
	}
	for k, o := range shipped {
		if !reflect.DeepEqual(o, test[k]) {
			a, _ := json.MarshalIndent(o, "", " ")
			b, _ := json.MarshalIndent(test[k], "", " ")
			c.t.Errorf("the overlay changes %s beyond host paths:\n%s\nvs\n%s", k, a, b)
		}
	}
}

// waitDaemonSets waits until each of the three DaemonSets has its one pod
// updated, ready and available.
func (c *cluster) waitDaemonSets() {
	c.t.Helper()
	c.waitFor("the DaemonSets Ready", 2*time.Minute, func() (bool, string) {
		var l appsv1.DaemonSetList
		c.get(&l, "ds", "-n", agentsNS)
		var status []string
		ready := len(l.Items) == len(agents)
		for _, ds := range l.Items {
			s := ds.Status
			status = append(status, fmt.Sprintf("%s %d/%d ready, %d updated", ds.Name, s.NumberReady, s.DesiredNumberScheduled, s.UpdatedNumberScheduled))
			ready = ready && s.ObservedGeneration == ds.Generation && s.DesiredNumberScheduled == 1 &&
				s.NumberReady == 1 && s.UpdatedNumberScheduled == 1 && s.NumberAvailable == 1
		}
		return ready, strings.Join(status, "; ")
	})
}

// waitAllocatable waits until the Node's allocatable resources are as given.
func (c *cluster) waitAllocatable(want map[string]string) {
	c.t.Helper()
	c.waitFor("the GPUs allocatable", time.Minute, func() (bool, string) {
		var n corev1.Node
		c.get(&n, "node", nodeName)
		for r, q := range want {
			if got := n.Status.Allocatable[corev1.ResourceName(r)]; got.String() != q {
				return false, fmt.Sprintf("%v", n.Status.Allocatable)
			}
		}
		return true, ""
	})
}

// heldDevices is what the consumer was given and holds open.
type heldDevices struct {
	containerID string
	pid         int
	ids         []string          // PCI addresses, as PodResources lists them
	nodes       map[string]string // path in the container → major:minor
}

// startConsumer runs a pod that asks for two GPUs by resource alone and
// holds every node it finds in /dev/vfio, and checks that its nodes came
// through CDI: the names the plugin's Allocate returned reached
// containerd, the container's nodes carry the CDI specs' device numbers
// (not the host's stand-ins'), and PodResources names the same devices,
// each of which resolves through the CDI specs on the node.
func (c *cluster) startConsumer(tree *vfiotest.Tree) *heldDevices {
	c.t.Helper()
	pod := fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: %s
  namespace: default
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: consumer
    image: %s
    args: ["hold", "/dev/vfio"]
    resources:
      limits:
        %s: "2"
`, consumer, podImage, gpuResource)
	if out, err := c.kubectlIn([]byte(pod), "apply", "-f", "-"); err != nil {
		c.t.Fatalf("apply the consumer: %v\n%s", err, out)
	}
	var p corev1.Pod
	c.waitFor("the consumer running", time.Minute, func() (bool, string) {
		c.get(&p, "pod", "-n", "default", consumer)
		return p.Status.Phase == corev1.PodRunning && len(p.Status.ContainerStatuses) == 1 && p.Status.ContainerStatuses[0].Ready,
			fmt.Sprintf("%s %+v", p.Status.Phase, p.Status.ContainerStatuses)
	})
	// The pod spec names no device: no CDI annotation, no host path.
	for k := range p.Annotations {
		if strings.HasPrefix(k, "cdi.k8s.io/") {
			c.t.Errorf("the consumer's spec names a CDI device: %s", k)
		}
	}
	ctr := p.Spec.Containers[0]
	if len(ctr.VolumeDevices) > 0 || len(ctr.Env) > 0 || len(ctr.Resources.Limits) != 1 ||
		slices.ContainsFunc(p.Spec.Volumes, func(v corev1.Volume) bool { return v.Projected == nil }) {
		c.t.Errorf("the consumer's spec names more than its GPU resource: %+v", p.Spec)
	}

	h := &heldDevices{containerID: strings.TrimPrefix(p.Status.ContainerStatuses[0].ContainerID, "containerd://"), nodes: map[string]string{}}
	var logs string
	c.waitFor("the consumer holding its devices", 30*time.Second, func() (bool, string) {
		logs, _ = c.kubectlErr("logs", "-n", "default", consumer)
		return strings.Contains(logs, "holding"), logs
	})
	for _, line := range strings.Split(logs, "\n") {
		if path, num, ok := strings.Cut(line, " "); ok {
			h.nodes[path] = num
		}
	}

	// PodResources, as Kata's cold plug asks it.
	conn, err := grpc.NewClient("unix:///var/lib/kubelet/pod-resources/kubelet.sock", grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		c.t.Fatal(err)
	}
	defer conn.Close()
	resp, err := podresources.NewPodResourcesListerClient(conn).List(context.Background(), &podresources.ListPodResourcesRequest{})
	if err != nil {
		c.t.Fatalf("PodResources List: %v", err)
	}
	var names []string
	for _, pr := range resp.PodResources {
		if pr.Name != consumer || pr.Namespace != "default" {
			continue
		}
		for _, ctr := range pr.Containers {
			for _, d := range ctr.Devices {
				if d.ResourceName != gpuResource {
					c.t.Errorf("PodResources: the consumer has %s %v", d.ResourceName, d.DeviceIds)
				}
				for _, id := range d.DeviceIds {
					h.ids = append(h.ids, id)
					names = append(names, d.ResourceName+"="+id)
				}
			}
		}
	}
	slices.Sort(h.ids)
	slices.Sort(names)
	if len(h.ids) != 2 {
		c.t.Fatalf("PodResources lists %v for the consumer, want two GPUs", h.ids)
	}

	// containerd was handed exactly those CDI names.
	var inspect struct {
		Info struct {
			Pid    int `json:"pid"`
			Config struct {
				CDIDevices []struct {
					Name string `json:"name"`
				} `json:"CDI_devices"`
			} `json:"config"`
		} `json:"info"`
	}
	out, err := exec.Command(tool(c.t, "crictl"), "--config", "/dev/null", "--runtime-endpoint", "unix://"+criSocket,
		"inspect", h.containerID).Output()
	if err != nil {
		c.t.Fatalf("crictl inspect: %v", err)
	}
	if err := json.Unmarshal(out, &inspect); err != nil {
		c.t.Fatal(err)
	}
	h.pid = inspect.Info.Pid
	var given []string
	for _, d := range inspect.Info.Config.CDIDevices {
		given = append(given, d.Name)
	}
	slices.Sort(given)
	if !slices.Equal(given, names) {
		c.t.Errorf("containerd got CDI devices %v; PodResources lists %v", given, names)
	}

	// The container's nodes are what the CDI specs say, and only those.
	want := c.resolveCDI(names)
	if !reflect.DeepEqual(h.nodes, want) {
		c.t.Errorf("the consumer's /dev/vfio is %v; the CDI specs give %v", h.nodes, want)
	}
	for path, num := range h.nodes {
		var st unix.Stat_t
		if err := unix.Stat(path, &st); err != nil {
			c.t.Errorf("no stand-in %s on the node: %v", path, err)
		} else if host := fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev)); host == num {
			c.t.Errorf("%s in the container is the host's %s: not injected by CDI", path, host)
		}
	}
	for _, id := range h.ids {
		if _, ok := h.nodes[fmt.Sprintf("/dev/vfio/%d", groupOf(c.t, tree, id))]; !ok {
			c.t.Errorf("the consumer was given %s but not its group's node: %v", id, h.nodes)
		}
	}
	c.checkConsumer(tree, h)
	c.t.Logf("consumer (pid %d): PodResources %v, CDI devices %v, holds %v", h.pid, h.ids, given, h.nodes)
	return h
}

// resolveCDI resolves CDI names through the specs on the node, as
// containerd does, and returns the device nodes they add.
func (c *cluster) resolveCDI(names []string) map[string]string {
	c.t.Helper()
	cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(cdiDir), cdiapi.WithAutoRefresh(false))
	if err != nil {
		c.t.Fatalf("CDI specs in %s: %v", cdiDir, err)
	}
	spec := &oci.Spec{}
	if _, err := cache.InjectDevices(spec, names...); err != nil {
		c.t.Fatalf("resolve %v through the CDI specs: %v", names, err)
	}
	out := map[string]string{}
	for _, d := range spec.Linux.Devices {
		out[d.Path] = fmt.Sprintf("%d:%d", d.Major, d.Minor)
	}
	return out
}

// checkConsumer checks that the consumer runs as it started: the same
// container, never restarted, its process holding every node it was given,
// its GPUs still on vfio-pci and their CDI names still resolving.
func (c *cluster) checkConsumer(tree *vfiotest.Tree, h *heldDevices) {
	c.t.Helper()
	var p corev1.Pod
	c.get(&p, "pod", "-n", "default", consumer)
	if p.Status.Phase != corev1.PodRunning || len(p.Status.ContainerStatuses) != 1 ||
		!strings.HasSuffix(p.Status.ContainerStatuses[0].ContainerID, h.containerID) || p.Status.ContainerStatuses[0].RestartCount != 0 {
		c.t.Errorf("the consumer is no longer the pod it was: %s %+v", p.Status.Phase, p.Status.ContainerStatuses)
	}
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", h.pid))
	open := map[string]bool{}
	for _, fd := range fds {
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", h.pid, fd.Name())); err == nil {
			open[l] = true
		}
	}
	for path := range h.nodes {
		if !open[path] {
			c.t.Errorf("the consumer (pid %d) no longer holds %s: %v", h.pid, path, open)
		}
	}
	var names []string
	for _, id := range h.ids {
		if d := tree.Driver(id); d != "vfio-pci" {
			c.t.Errorf("the consumer's GPU %s is on %q", id, d)
		}
		names = append(names, gpuResource+"="+id)
	}
	if got := c.resolveCDI(names); !reflect.DeepEqual(got, h.nodes) {
		c.t.Errorf("the consumer's CDI names now resolve to %v, not %v", got, h.nodes)
	}
}

// rollout restarts a DaemonSet as an administrator does and waits until
// its new pod is Ready and the old one gone.
func (c *cluster) rollout(agent string) {
	c.t.Helper()
	old := c.agentPod(agent)
	c.kubectl("-n", agentsNS, "rollout", "restart", "ds/"+agent)
	c.kubectl("-n", agentsNS, "rollout", "status", "ds/"+agent, "--timeout=3m")
	c.waitFor("the new "+agent+" pod Ready", 2*time.Minute, func() (bool, string) {
		var l corev1.PodList
		c.get(&l, "pods", "-n", agentsNS, "-l", "app.kubernetes.io/name="+agent)
		if len(l.Items) != 1 || l.Items[0].UID == old.UID {
			return false, fmt.Sprintf("%d pods", len(l.Items))
		}
		for _, cond := range l.Items[0].Status.Conditions {
			if cond.Type == corev1.PodReady {
				return cond.Status == corev1.ConditionTrue, string(cond.Status)
			}
		}
		return false, "no Ready condition"
	})
}

func (c *cluster) agentPod(agent string) corev1.Pod {
	c.t.Helper()
	var l corev1.PodList
	c.get(&l, "pods", "-n", agentsNS, "-l", "app.kubernetes.io/name="+agent)
	if len(l.Items) != 1 {
		c.t.Fatalf("%d pods of %s", len(l.Items), agent)
	}
	return l.Items[0]
}

// mixed makes the node a mixed one, as docs/vfio-manager.md says: the
// Node's annotation asks for 4 GPUs for VMs while the consumer holds 2.
// vfio-manager keeps the consumer's, gives back 4 other GPUs and the
// NVSwitches (a partial fabric is not for VMs), the device plugin stops
// offering them, and the Node's labels count 4 and 4.
func (c *cluster) mixed(tree *vfiotest.Tree, h *heldDevices, start clusterNodeState) {
	c.t.Helper()
	c.kubectl("annotate", "node", nodeName, vfiomanager.PolicyKey+"=4")
	c.waitSplit(4, 4)
	c.waitEvent("VFIOGivenBack")
	var vm []string
	for _, addr := range vfiotest.HGXH100GPUs {
		if tree.Driver(addr) == "vfio-pci" {
			vm = append(vm, addr)
		} else if d, was := tree.Driver(addr), start["driver "+addr]; d != was {
			c.t.Errorf("%s on %q after it was given back, want %s", addr, d, was)
		}
	}
	if len(vm) != 4 || !slices.Contains(vm, h.ids[0]) || !slices.Contains(vm, h.ids[1]) {
		c.t.Errorf("GPUs left on vfio-pci: %v; want 4 with the consumer's %v", vm, h.ids)
	}
	for _, addr := range vfiotest.HGXH100NVSwitches {
		if d, was := tree.Driver(addr), start["driver "+addr]; d != was {
			c.t.Errorf("NVSwitch %s on %q with 4 of 8 GPUs for VMs, want %s", addr, d, was)
		}
	}
	c.waitAllocatable(map[string]string{gpuResource: "4", "nvidia.com/nvswitch": "0"})
	c.checkConsumer(tree, h)
}

// waitSplit waits for vfio-manager's labels on the Node to count vm GPUs
// for VMs and container GPUs for containers.
func (c *cluster) waitSplit(vm, container int) {
	c.t.Helper()
	want := fmt.Sprintf("%s=%d %s=%d", vfiomanager.VMCountLabel, vm, vfiomanager.ContainerCountLabel, container)
	c.waitFor("the Node's labels to say "+want, time.Minute, func() (bool, string) {
		var n corev1.Node
		c.get(&n, "node", nodeName)
		got := fmt.Sprintf("%s=%s %s=%s", vfiomanager.VMCountLabel, n.Labels[vfiomanager.VMCountLabel],
			vfiomanager.ContainerCountLabel, n.Labels[vfiomanager.ContainerCountLabel])
		return got == want, got
	})
}

// waitEvent waits for an Event about the Node with this reason.
func (c *cluster) waitEvent(reason string) {
	c.t.Helper()
	c.waitFor("an Event "+reason+" about the Node", time.Minute, func() (bool, string) {
		var l corev1.EventList
		c.get(&l, "events", "-A", "--field-selector", "involvedObject.kind=Node,involvedObject.name="+nodeName+",reason="+reason)
		if len(l.Items) == 0 {
			return false, "none"
		}
		return l.Items[0].Source.Component == "vfio-manager", fmt.Sprintf("from %+v", l.Items[0].Source)
	})
}

// giveBack gives the node back as docs/vfio-manager.md and
// docs/kata-manager.md say: the DaemonSets' pods go (their node labels
// removed), an unbind while the consumer still holds its GPUs gives back
// only the others and names the consumer, then, the consumer deleted,
// kata-manager uninstall, sandbox-device-plugin uninstall and vfio-manager
// unbind --all run on the node with the DaemonSets' own image, mounts and
// environment, and the manifests are deleted.
func (c *cluster) giveBack(tree *vfiotest.Tree, h *heldDevices, ctd *testbed.Containerd) {
	c.t.Helper()
	templates := map[string]corev1.PodSpec{}
	for _, agent := range agents {
		var ds appsv1.DaemonSet
		c.get(&ds, "ds", "-n", agentsNS, agent)
		templates[agent] = ds.Spec.Template.Spec
	}
	c.kubectl("label", "node", nodeName, "nvidia.com/gpu.deploy.vfio-manager-",
		"nvidia.com/gpu.deploy.sandbox-device-plugin-", "nvidia.com/gpu.deploy.kata-manager-")
	c.waitFor("the agents' pods gone", 2*time.Minute, func() (bool, string) {
		var l corev1.PodList
		c.get(&l, "pods", "-n", agentsNS)
		return len(l.Items) == 0, fmt.Sprintf("%d pods", len(l.Items))
	})

	phase, logs := c.runOnNode("unbind-held", templates["vfio-manager"], "unbind", "--all")
	if phase != corev1.PodFailed || !strings.Contains(logs, fmt.Sprintf("pid %d", h.pid)) {
		c.t.Errorf("unbind while the consumer (pid %d) holds its GPUs: %s\n%s", h.pid, phase, logs)
	}
	for _, addr := range vfiotest.HGXH100GPUs {
		want := "nvidia"
		if slices.Contains(h.ids, addr) {
			want = "vfio-pci"
		}
		if d := tree.Driver(addr); d != want {
			c.t.Errorf("%s on %q after an unbind with the consumer running, want %s", addr, d, want)
		}
	}

	c.kubectl("delete", "pod", "-n", "default", consumer, "--wait", "--timeout=60s")
	starts := ctd.Starts()
	for _, step := range []struct {
		agent string
		args  []string
	}{
		{"kata-manager", []string{"uninstall", "--remove-artifacts"}},
		{"sandbox-device-plugin", []string{"uninstall"}},
		{"vfio-manager", []string{"unbind", "--all"}},
	} {
		if phase, logs := c.runOnNode(step.agent+"-"+step.args[0], templates[step.agent], step.args...); phase != corev1.PodSucceeded {
			c.t.Errorf("%s %v: %s\n%s", step.agent, step.args, phase, logs)
		}
	}
	if n := ctd.Starts(); n != starts+1 {
		c.t.Errorf("kata-manager uninstall: containerd started %d times, want one restart", n-starts)
	}
	if runtimes := criRuntimes(c.t, criSocket); runtimes["kata-qemu-nvidia-gpu"] != nil || runtimes["kata-qemu-nvidia-gpu-snp"] != nil {
		c.t.Errorf("the runtime classes are still in containerd after uninstall: %v", slices.Collect(maps.Keys(runtimes)))
	}
	c.kubectl("delete", "-k", overlay, "--wait", "--timeout=2m")
}

// runOnNode runs a pod with an agent's DaemonSet pod spec on the node,
// args in place of the daemon's, and returns how it ended and its log.
func (c *cluster) runOnNode(name string, spec corev1.PodSpec, args ...string) (corev1.PodPhase, string) {
	c.t.Helper()
	spec = *spec.DeepCopy()
	spec.NodeName, spec.NodeSelector, spec.RestartPolicy = nodeName, nil, corev1.RestartPolicyNever
	ctr := &spec.Containers[0]
	ctr.Args, ctr.ReadinessProbe, ctr.LivenessProbe, ctr.Ports = args, nil, nil, nil
	pod := corev1.Pod{TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: agentsNS}, Spec: spec}
	b, err := json.Marshal(pod)
	if err != nil {
		c.t.Fatal(err)
	}
	if out, err := c.kubectlIn(b, "apply", "-f", "-"); err != nil {
		c.t.Fatalf("run %s: %v\n%s", name, err, out)
	}
	var p corev1.Pod
	c.waitFor(name+" to finish", 2*time.Minute, func() (bool, string) {
		c.get(&p, "pod", "-n", agentsNS, name)
		return p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed, string(p.Status.Phase)
	})
	logs, _ := c.kubectlErr("logs", "-n", agentsNS, name)
	c.kubectl("delete", "pod", "-n", agentsNS, name, "--wait", "--timeout=60s")
	return p.Status.Phase, logs
}

// clusterNodeState is what the agents change on a node and must give back: each
// device's driver, the containerd configuration directory (every file,
// byte for byte), the CDI specs, vfio-manager's state records and the
// Kata artifacts.
type clusterNodeState map[string]string

func takeClusterState(t *testing.T, tree *vfiotest.Tree, devices []string) clusterNodeState {
	t.Helper()
	s := clusterNodeState{}
	for _, addr := range devices {
		s["driver "+addr] = tree.Driver(addr)
	}
	for _, dir := range []string{filepath.Join(tree.HostRoot, "etc/containerd"), cdiDir, "/run/nvidia/vfio-manager",
		filepath.Join(tree.HostRoot, "opt/nvidia-gpu-operator/artifacts/runtimeclasses")} {
		filepath.Walk(dir, func(path string, info os.FileInfo, err error) error {
			if err == nil && !info.IsDir() {
				b, _ := os.ReadFile(path)
				s["file "+path] = string(b)
			}
			return nil
		})
	}
	return s
}

// diff says what differs between two states.
func (s clusterNodeState) diff(now clusterNodeState) string {
	var out []string
	for k, v := range s {
		if w, ok := now[k]; !ok {
			out = append(out, "gone: "+k)
		} else if w != v {
			out = append(out, fmt.Sprintf("changed: %s\n  was %q\n  now %q", k, v, w))
		}
	}
	for k := range now {
		if _, ok := s[k]; !ok {
			out = append(out, "new: "+k)
		}
	}
	slices.Sort(out)
	return strings.Join(out, "\n")
}
