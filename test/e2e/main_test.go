// Package e2e runs the project's binaries as a user does: built with the
// Makefile's flags, against fake nodes, real registries, a real containerd,
// the kubelet's own device manager and a real kernel.
package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// binDir holds the binaries built once for the whole run.
var binDir string

const testVersion = "v0.0.0-e2e"

// binDirEnv hands the built binaries to a test rerun in a child process.
const binDirEnv = "GPU_SANDBOX_E2E_BIN"

func TestMain(m *testing.M) {
	if dir := os.Getenv(binDirEnv); dir != "" {
		binDir = dir
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "gpu-sandbox-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	code := 1
	if err := buildBinaries(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
	} else {
		code = m.Run()
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

func buildBinaries(dir string) error {
	cmd := exec.Command("go", "build", "-o", dir,
		"-ldflags", "-X github.com/gpu-sandbox/gpu-sandbox/internal/version.Version="+testVersion,
		"./cmd/...", "./test/e2e/cmd/discover", "./test/e2e/cmd/vfiouser")
	cmd.Dir = repoRoot()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build binaries: %v\n%s", err, out)
	}
	// The GPU Operator calls the binary vfio-manage.
	return os.Symlink("vfio-manager", filepath.Join(dir, "vfio-manage"))
}

// result is one finished run of a binary.
type result struct {
	code           int
	stdout, stderr string
}

// run runs a binary with args and extra environment, and waits for it.
func run(t *testing.T, name string, env []string, args ...string) result {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, name), args...)
	cmd.Env = append(cleanEnv(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := result{stdout: stdout.String(), stderr: stderr.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run %s %s: %v", name, strings.Join(args, " "), err)
	}
	return r
}

// cleanEnv keeps the variables a binary needs and drops any that would
// change its flags.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "PATH", "HOME", "TMPDIR":
			env = append(env, kv)
		}
	}
	return env
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}
