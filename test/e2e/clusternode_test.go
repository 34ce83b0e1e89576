//go:build cluster

package e2e

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The cluster's node is the machine seen from namespaces of the test's
// own: mounts (so /run, /var/lib, /var/log and /dev are directories of the
// work dir, and nothing the kubelet, containerd or the agents write
// reaches the machine), network (a bridge for pods, the API server's
// Service IP on lo: no kube-proxy) and PIDs (every process the cluster
// starts ends with it). Cgroups have no such namespace: the kubelet's
// cgroup root is made by the parent test, which removes it afterwards.

const (
	clusterWorkEnv   = "GPU_SANDBOX_E2E_CLUSTER_WORK"
	clusterCgroupEnv = "GPU_SANDBOX_E2E_CLUSTER_CGROUP"
	nodeIP           = "10.88.0.1" // on the pods' bridge, the node's InternalIP and the registry's address
	podSubnet        = "10.88.0.0/16"
	serviceIP        = "10.0.0.1" // the kubernetes Service, put on lo
	serviceRange     = "10.0.0.0/24"
	nodeName         = "gpu-node-1"
	fakeNode         = "/run/fake-node" // the vfiotest tree (testdata/cluster points the agents at it)
	cgroupPrefix     = "gpu-sandbox-e2e-"
)

// hostPaths are where the cluster would write if a path escaped its
// namespaces: none may change on the machine.
var hostPaths = []string{"/run/containerd", "/run/nvidia", "/run/cdi", "/run/netns", "/run/fake-node",
	"/var/lib/kubelet", "/var/lib/containerd", "/var/lib/cni", "/var/log/pods", "/var/log/containers",
	"/etc/containerd", "/etc/cni", "/etc/cdi", "/opt/containerd", "/opt/nvidia-gpu-operator",
	"/dev/vfio", "/dev/termination-log"}

// inClusterNamespaces reruns the test in its own mount, network and PID
// namespaces with a fresh work dir and cgroup root, and reports false in
// the parent, which returns once it has checked that the run left
// nothing behind. In the child it reports true with the work dir.
func inClusterNamespaces(t *testing.T) (string, bool) {
	t.Helper()
	if w := os.Getenv(clusterWorkEnv); w != "" {
		return w, true
	}
	needRoot(t)
	removeStaleCgroups(t)
	work, err := os.MkdirTemp("", "gpu-sandbox-cluster-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(work, "tmp"), 0o700); err != nil {
		t.Fatal(err)
	}
	cgroup := cgroupPrefix + strconv.Itoa(os.Getpid())
	before := takeHostState(t)
	makeCgroup(t, cgroup)

	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "--net", "--pid", "--fork",
		"--mount-proc", "--kill-child", "--", os.Args[0], "-test.run", "^"+t.Name()+"$", "-test.count=1",
		"-test.v", "-test.timeout=20m")
	cmd.Env = append(os.Environ(), clusterWorkEnv+"="+work, clusterCgroupEnv+"="+cgroup,
		binDirEnv+"="+binDir, "TMPDIR="+filepath.Join(work, "tmp"))
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	// If this process dies, unshare dies, and takes the namespaces with it.
	// The signal follows the thread that started unshare: keep it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	runtime.LockOSThread()
	runErr := cmd.Run()
	runtime.UnlockOSThread()
	ns, _ := os.ReadFile(filepath.Join(work, "namespaces"))

	// Nothing left: processes, mounts, interfaces, cgroups, files.
	if err := removeCgroup(cgroup); err != nil {
		t.Errorf("cgroup root: %v", err)
	}
	after := takeHostState(t)
	for _, d := range before.diff(after) {
		t.Errorf("left behind: %s", d)
	}
	for _, n := range strings.Fields(string(ns)) {
		if users := nsUsers(n); len(users) > 0 {
			t.Errorf("namespace %s still used by %v", n, users)
		}
	}
	if err := os.RemoveAll(work); err != nil {
		t.Errorf("remove the work dir: %v", err)
	}
	if runErr != nil {
		t.Fatalf("the cluster run failed: %v", runErr)
	}
	return "", false
}

// hostState is what the machine shows of the places a cluster could leave
// something: mount points, network interfaces, the files under hostPaths.
type hostState struct {
	mounts []string
	ifaces []string
	files  []string
}

func takeHostState(t *testing.T) hostState {
	t.Helper()
	var s hostState
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) > 4 {
			s.mounts = append(s.mounts, "mount "+fields[4])
		}
	}
	ifs, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range ifs {
		s.ifaces = append(s.ifaces, "interface "+i.Name)
	}
	for _, p := range hostPaths {
		filepath.Walk(p, func(path string, info os.FileInfo, err error) error {
			if err == nil {
				s.files = append(s.files, "file "+path)
			}
			return nil
		})
	}
	return s
}

// diff lists what after has that s had not.
func (s hostState) diff(after hostState) []string {
	var out []string
	for _, pair := range [][2][]string{{s.mounts, after.mounts}, {s.ifaces, after.ifaces}, {s.files, after.files}} {
		for _, x := range pair[1] {
			if !slices.Contains(pair[0], x) {
				out = append(out, x)
			}
		}
	}
	return out
}

// nsUsers lists the processes in a namespace ("pid:[4026532]").
func nsUsers(ns string) []string {
	var users []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		for _, kind := range []string{"pid", "net", "mnt"} {
			if l, err := os.Readlink(filepath.Join("/proc", e.Name(), "ns", kind)); err == nil && l == ns {
				users = append(users, e.Name())
			}
		}
	}
	return users
}

// cgroupHierarchies are the mount points of the machine's cgroup file
// systems (v1 controllers and the unified one).
func cgroupHierarchies(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		_, after, ok := strings.Cut(line, " - ")
		fields := strings.Fields(line)
		if ok && len(fields) > 4 && (strings.HasPrefix(after, "cgroup ") || strings.HasPrefix(after, "cgroup2 ")) {
			out = append(out, fields[4])
		}
	}
	return out
}

// makeCgroup creates the kubelet's cgroup root in every hierarchy (the
// kubelet requires it to exist), cpuset's with its parent's CPUs and
// memory nodes.
func makeCgroup(t *testing.T, name string) {
	t.Helper()
	for _, h := range cgroupHierarchies(t) {
		dir := filepath.Join(h, name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatalf("cgroup root: %v", err)
		}
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			if b, err := os.ReadFile(filepath.Join(h, f)); err == nil {
				os.WriteFile(filepath.Join(dir, f), b, 0o644)
			}
		}
	}
}

// removeCgroup removes a cgroup root and every cgroup below it, deepest
// first, in every hierarchy; a cgroup whose last process is still exiting
// is retried for a few seconds.
func removeCgroup(name string) error {
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	var dirs []string
	for _, line := range strings.Split(string(mi), "\n") {
		_, after, ok := strings.Cut(line, " - ")
		fields := strings.Fields(line)
		if ok && len(fields) > 4 && (strings.HasPrefix(after, "cgroup ") || strings.HasPrefix(after, "cgroup2 ")) {
			filepath.Walk(filepath.Join(fields[4], name), func(path string, info os.FileInfo, err error) error {
				if err == nil && info.IsDir() {
					dirs = append(dirs, path)
				}
				return nil
			})
		}
	}
	slices.SortFunc(dirs, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	deadline := time.Now().Add(10 * time.Second)
	for _, d := range dirs {
		for {
			err := unix.Rmdir(d)
			if err == nil || os.IsNotExist(err) {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("rmdir %s: %w", d, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return nil
}

// removeStaleCgroups removes the cgroup roots of earlier runs whose test
// process died before it could.
func removeStaleCgroups(t *testing.T) {
	t.Helper()
	for _, h := range cgroupHierarchies(t) {
		entries, _ := os.ReadDir(h)
		for _, e := range entries {
			pid, err := strconv.Atoi(strings.TrimPrefix(e.Name(), cgroupPrefix))
			if err != nil || !strings.HasPrefix(e.Name(), cgroupPrefix) || syscall.Kill(pid, 0) == nil {
				continue
			}
			removeCgroup(e.Name())
		}
	}
}

// setUpNode makes the namespaces the cluster's node: the work dir's
// directories over /run, /var/lib and /var/log; lo with the Service IP and
// a bridge with the node's address.
func setUpNode(t *testing.T, work string) {
	t.Helper()
	var ns []string
	for _, kind := range []string{"pid", "net", "mnt"} {
		l, err := os.Readlink("/proc/self/ns/" + kind)
		if err != nil {
			t.Fatal(err)
		}
		ns = append(ns, l)
	}
	if err := os.WriteFile(filepath.Join(work, "namespaces"), []byte(strings.Join(ns, " ")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{"/run", "/var/lib", "/var/log"} {
		src := filepath.Join(work, "node", dir)
		if err := os.MkdirAll(src, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount(src, dir, "", unix.MS_BIND, ""); err != nil {
			t.Fatalf("bind %s over %s: %v", src, dir, err)
		}
	}
	for _, args := range [][]string{
		{"link", "set", "lo", "up"},
		{"addr", "add", serviceIP + "/32", "dev", "lo"},
		{"link", "add", "cni0", "type", "bridge"},
		{"addr", "add", nodeIP + "/16", "dev", "cni0"},
		{"link", "set", "cni0", "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// standInNumbers are the device numbers of the stand-in /dev/vfio nodes:
// /dev/null's, which the test machine's kernel answers. The fake kernel's
// nodes have other numbers (its sysfs says 243:N and 10:196), and the CDI
// specs carry those: a container whose /dev/vfio nodes have the fake
// kernel's numbers got them through CDI, not through the kubelet's
// device list, which only names a host path.
const standInMajor, standInMinor = 1, 3

// standInDev puts an overlay over /dev (the machine's nodes below, the
// work dir above, /dev's own mounts carried over) and adds /dev/vfio/vfio
// and /dev/vfio/<group> for the groups given: the kubelet hands containerd
// the host paths the device plugin names, and containerd needs a device
// node there.
func standInDev(t *testing.T, work string, groups []int) {
	t.Helper()
	upper, wd, merged := filepath.Join(work, "dev", "upper"), filepath.Join(work, "dev", "work"), filepath.Join(work, "dev", "merged")
	for _, d := range []string{upper, wd, merged} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Mount("overlay", merged, "overlay", 0, "lowerdir=/dev,upperdir="+upper+",workdir="+wd); err != nil {
		t.Fatalf("overlay over /dev: %v", err)
	}
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(mi), "\n") {
		fields := strings.Fields(line)
		if len(fields) > 4 && strings.HasPrefix(fields[4], "/dev/") {
			target := filepath.Join(merged, strings.TrimPrefix(fields[4], "/dev/"))
			os.MkdirAll(target, 0o755)
			if err := unix.Mount(fields[4], target, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
				t.Fatalf("carry %s over: %v", fields[4], err)
			}
		}
	}
	vfioDir := filepath.Join(merged, "vfio")
	if err := os.MkdirAll(vfioDir, 0o755); err != nil {
		t.Fatal(err)
	}
	names := []string{"vfio"}
	for _, g := range groups {
		names = append(names, strconv.Itoa(g))
	}
	for _, n := range names {
		if err := unix.Mknod(filepath.Join(vfioDir, n), unix.S_IFCHR|0o666, int(unix.Mkdev(standInMajor, standInMinor))); err != nil {
			t.Fatalf("stand-in /dev/vfio/%s: %v", n, err)
		}
	}
	if err := unix.Mount(merged, "/dev", "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		t.Fatalf("bind the new /dev: %v", err)
	}
}
