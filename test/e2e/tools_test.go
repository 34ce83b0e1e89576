package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/containerd"
)

// tool returns a pinned CLI that hack/install-test-deps.sh built; a missing
// one fails the test, never skips it.
func tool(t testing.TB, name string) string {
	t.Helper()
	path := filepath.Join(repoRoot(), ".cache", "bin", name)
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("%s is missing: run hack/install-test-deps.sh (make test does)", name)
	}
	return path
}

// program returns a program from the system; a missing one fails the test.
func program(t testing.TB, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is missing: run hack/install-test-deps.sh (make test does)", name)
	}
	return path
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// dockerRegistry is Debian's docker-registry (distribution 2.8) on loopback.
type dockerRegistry struct {
	Host string
	log  *bytes.Buffer
	mu   *sync.Mutex
}

func startDockerRegistry(t testing.TB) *dockerRegistry {
	t.Helper()
	dir := t.TempDir()
	host := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cfg := filepath.Join(dir, "config.yml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, filepath.Join(dir, "data"), host)), 0o644)
	r := &dockerRegistry{Host: host, log: &bytes.Buffer{}, mu: &sync.Mutex{}}
	cmd := exec.Command(program(t, "docker-registry"), "serve", cfg)
	cmd.Stdout = lockedWriter{r.mu, r.log}
	cmd.Stderr = lockedWriter{r.mu, r.log}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitHTTP(t, "http://"+host+"/v2/")
	return r
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

var blobGet = regexp.MustCompile(`"GET /v2/[^" ]*/blobs/sha256:`)

// blobGets counts the blob downloads in the registry's access log so far.
func (r *dockerRegistry) blobGets() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(blobGet.FindAllString(r.log.String(), -1))
}

func waitHTTP(t testing.TB, url string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if resp, err := http.Get(url); err == nil {
			resp.Body.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not answer within 10s", url)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// orasPush pushes files with the oras CLI as users do: each layer titled
// with the file name.
func orasPush(t testing.TB, ref string, files artifactFiles) {
	t.Helper()
	dir := t.TempDir()
	args := []string{"push", "--plain-http", "--disable-path-validation", ref}
	for _, name := range sortedKeys(files) {
		if err := os.WriteFile(filepath.Join(dir, name), files[name], 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args, name)
	}
	cmd := exec.Command(tool(t, "oras"), args...)
	cmd.Dir = dir
	cmd.Env = append(cleanEnv(), "HOME="+dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("oras push %s: %v\n%s", ref, err, out)
	}
}

// containerdProc is Debian's containerd run by the test, restarted when it
// exits (as systemd would), so that kata-manager's signal restart works.
type containerdProc struct {
	Config string
	Socket string
	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{} // closed when cmd has been waited for
	log    *bytes.Buffer
	stop   bool
	starts int
}

// containerdBase is a version 2 configuration for a containerd that keeps
// everything under dir.
func containerdBase(dir string) string {
	return fmt.Sprintf(`# A node's containerd configuration, with the comments an administrator keeps.
version = 2
root = "%[1]s/root"
state = "%[1]s/state"

[grpc]
  address = "%[1]s/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "%[1]s/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
`, dir)
}

func startContainerd(t testing.TB, config, socket string) *containerdProc {
	t.Helper()
	c := &containerdProc{Config: config, Socket: socket, log: &bytes.Buffer{}}
	c.start(t)
	t.Cleanup(func() {
		c.mu.Lock()
		c.stop = true
		c.mu.Unlock()
		for { // a restart may be under way: stop whichever process is current
			c.mu.Lock()
			cmd, exited := c.cmd, c.exited
			c.mu.Unlock()
			cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-exited:
			case <-time.After(10 * time.Second):
				cmd.Process.Kill()
				<-exited
			}
			c.mu.Lock()
			current := c.cmd == cmd
			c.mu.Unlock()
			if current {
				break
			}
		}
		if t.Failed() {
			t.Logf("containerd log:\n%s", c.logs())
		}
	})
	if err := containerd.NewRestarter(containerd.RestartNone, socket, "/", 10*time.Second).WaitReady(context.Background()); err != nil {
		t.Fatalf("containerd: %v\n%s", err, c.logs())
	}
	return c
}

// start runs containerd; the goroutine that waits for it starts it again
// when it exits, unless the test is over.
func (c *containerdProc) start(t testing.TB) {
	cmd := exec.Command(program(t, "containerd"), "--config", c.Config)
	cmd.Stdout = lockedWriter{&c.mu, c.log}
	cmd.Stderr = lockedWriter{&c.mu, c.log}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	c.mu.Lock()
	c.cmd, c.exited = cmd, exited
	c.starts++
	c.mu.Unlock()
	go func() {
		cmd.Wait()
		c.mu.Lock()
		stop := c.stop
		c.mu.Unlock()
		if !stop {
			c.start(t)
		}
		close(exited)
	}()
}

func (c *containerdProc) logs() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.log.String()
}

func (c *containerdProc) Starts() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.starts
}

// criRuntimes asks containerd through crictl for its CRI runtimes.
func criRuntimes(t testing.TB, socket string) map[string]map[string]any {
	t.Helper()
	out, err := exec.Command(tool(t, "crictl"), "--config", "/dev/null", "--runtime-endpoint", "unix://"+socket, "info").Output()
	if err != nil {
		t.Fatalf("crictl info: %v", err)
	}
	var info struct {
		Config struct {
			Containerd struct {
				Runtimes map[string]map[string]any `json:"runtimes"`
			} `json:"containerd"`
		} `json:"config"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("crictl info: %v\n%s", err, out)
	}
	return info.Config.Containerd.Runtimes
}

// dumpConfig is containerd's own reading of a configuration, imports
// included; it fails on a configuration containerd cannot load.
func dumpConfig(t testing.TB, config string) string {
	t.Helper()
	out, err := exec.Command(program(t, "containerd"), "--config", config, "config", "dump").CombinedOutput()
	if err != nil {
		t.Fatalf("containerd config dump: %v\n%s", err, out)
	}
	return string(out)
}
