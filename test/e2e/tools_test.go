package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sync"
	"testing"
	"time"

	"github.com/gpu-sandbox/gpu-sandbox/test/e2e/testbed"
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
	cmd := exec.Command(testbed.Program(t, "docker-registry"), "serve", cfg)
	cmd.Stdout = testbed.LockedWriter{Mu: r.mu, W: r.log}
	cmd.Stderr = testbed.LockedWriter{Mu: r.mu, W: r.log}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitHTTP(t, "http://"+host+"/v2/")
	return r
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
func orasPush(t testing.TB, ref string, files testbed.Files) {
	t.Helper()
	dir := t.TempDir()
	args := []string{"push", "--plain-http", "--disable-path-validation", ref}
	for _, name := range testbed.SortedKeys(files) {
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
	out, err := exec.Command(testbed.Program(t, "containerd"), "--config", config, "config", "dump").CombinedOutput()
	if err != nil {
		t.Fatalf("containerd config dump: %v\n%s", err, out)
	}
	return string(out)
}
