package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

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

// freeAddr is a loopback address nobody listens on, for an agent's health server.
func freeAddr(t testing.TB) string {
	t.Helper()
	return fmt.Sprintf("127.0.0.1:%d", freePort(t))
}

// httpGet returns a page's body, or "" while nothing answers.
func httpGet(t testing.TB, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}
