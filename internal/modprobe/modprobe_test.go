package modprobe_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gpu-sandbox/gpu-sandbox/internal/modprobe"
)

// The host's modprobe runs inside the host root: a fake host root whose
// modprobe is a script that records its arguments shows it.
func TestLoadModuleRunsTheHostsModprobe(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("chroot needs root (make test runs as root in CI)")
	}
	root := t.TempDir()
	for _, d := range []string{"usr/sbin", "bin", "tmp"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	busybox := "/bin/busybox"
	if _, err := os.Stat(busybox); err != nil {
		t.Fatalf("%s missing: run hack/install-test-deps.sh", busybox)
	}
	b, _ := os.ReadFile(busybox)
	os.WriteFile(filepath.Join(root, "bin/sh"), b, 0o755)
	os.WriteFile(filepath.Join(root, "usr/sbin/modprobe"), []byte("#!/bin/sh\necho \"$@\" > /tmp/loaded\n[ \"$1\" != missing ]\n"), 0o755)

	l := modprobe.New(root)
	if err := l.LoadModule(context.Background(), "vhost_vsock"); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(filepath.Join(root, "tmp/loaded"))
	if strings.TrimSpace(string(got)) != "vhost_vsock" {
		t.Errorf("modprobe got %q", got)
	}
	if err := l.LoadModule(context.Background(), "missing"); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("failing modprobe: %v", err)
	}
	if err := modprobe.New(t.TempDir()).LoadModule(context.Background(), "x"); err == nil || !strings.Contains(err.Error(), "not found in the host root") {
		t.Errorf("host root without modprobe: %v", err)
	}
}
