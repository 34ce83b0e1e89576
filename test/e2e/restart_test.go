package e2e

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/containerd"
	"github.com/gpu-sandbox/gpu-sandbox/test/e2e/testbed"
)

// TestRestartSystemd checks the systemd restart mode as it runs in the
// kata-manager container: systemctl is the host's, started chrooted into
// the host root, and its failure is reported with what it printed. The
// host root holds busybox and a systemctl script in place of systemd.
func TestRestartSystemd(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the systemd restart chroots into the host root and needs root (make test runs as root in CI)")
	}
	socket := filepath.Join(t.TempDir(), "containerd.sock")
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	healthpb.RegisterHealthServer(srv, health.NewServer()) // serving, as containerd after its restart
	go srv.Serve(l)
	t.Cleanup(srv.Stop)

	for _, tc := range []struct {
		name, script, wantErr string
	}{
		{name: "restarted", script: `echo "$@" > /systemctl.args`},
		{name: "unit missing", script: `echo "Failed to restart containerd.service: Unit containerd.service not found." >&2; exit 5`,
			wantErr: "Unit containerd.service not found."},
	} {
		t.Run(tc.name, func(t *testing.T) {
			host := t.TempDir()
			for _, dir := range []string{"bin", "usr/bin"} {
				if err := os.MkdirAll(filepath.Join(host, dir), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			copyFile(t, testbed.Program(t, "busybox"), filepath.Join(host, "bin", "busybox"), 0o755)
			if err := os.WriteFile(filepath.Join(host, "usr", "bin", "systemctl"), []byte("#!/bin/busybox sh\n"+tc.script+"\n"), 0o755); err != nil {
				t.Fatal(err)
			}
			restarted, err := containerd.NewRestarter(containerd.RestartSystemd, socket, containerd.WithHostRoot(host), containerd.WithTimeout(5*time.Second)).Restart(context.Background())
			if tc.wantErr != "" {
				if restarted || err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Restart = %v, %v; want an error with %q", restarted, err, tc.wantErr)
				}
				return
			}
			if !restarted || err != nil {
				t.Fatalf("Restart = %v, %v", restarted, err)
			}
			args, err := os.ReadFile(filepath.Join(host, "systemctl.args"))
			if err != nil || string(args) != "restart containerd\n" {
				t.Fatalf("systemctl in the host root got %q (%v), want \"restart containerd\"", args, err)
			}
		})
	}
}

// kata-manager asks the running containerd which release it is, to load
// its configuration by that release's rules.
func TestReleaseFromTheDaemon(t *testing.T) {
	dir, err := os.MkdirTemp("", "rel") // short: the socket path lives here
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	main := filepath.Join(dir, "config.toml")
	os.WriteFile(main, []byte(testbed.ContainerdBase(dir)), 0o644)
	socket := filepath.Join(dir, "containerd.sock")
	testbed.StartContainerd(t, main, socket)
	r, err := containerd.NewRestarter(containerd.RestartNone, socket, containerd.WithTimeout(time.Second)).Release(context.Background())
	if err != nil || r != containerd.Release16 {
		t.Errorf("Release = %v, %v; want Debian's 1.6", r, err)
	}
	if _, err := containerd.NewRestarter(containerd.RestartNone, filepath.Join(dir, "none.sock"), containerd.WithTimeout(time.Second)).Release(context.Background()); err == nil {
		t.Error("a release from a socket nobody serves")
	}
}

// Before a restart, the node's own containerd reads the configuration:
// one it refuses is never restarted into. Where its binary cannot read the
// same file (another host root), nothing is claimed.
func TestCheckWithTheNodesContainerd(t *testing.T) {
	dir := t.TempDir()
	main := filepath.Join(dir, "config.toml")
	os.WriteFile(main, []byte(testbed.ContainerdBase(dir)), 0o644)
	r := containerd.NewRestarter(containerd.RestartSignal, filepath.Join(dir, "c.sock"), containerd.WithTimeout(time.Second))
	if checked, err := r.Check(context.Background(), main); !checked || err != nil {
		t.Fatalf("Check of a good configuration = %v, %v", checked, err)
	}
	os.WriteFile(filepath.Join(dir, "junk.toml"), []byte("not TOML\n"), 0o644)
	os.WriteFile(main, []byte("version = 2\nimports = [\"junk.toml\"]\n"), 0o644)
	if checked, err := r.Check(context.Background(), main); !checked || !errors.Is(err, containerd.ErrInvalidConfig) || !strings.Contains(err.Error(), "junk.toml") {
		t.Errorf("Check of a configuration containerd refuses = %v, %v", checked, err)
	}
	other := containerd.NewRestarter(containerd.RestartSignal, filepath.Join(dir, "c.sock"), containerd.WithHostRoot(t.TempDir()), containerd.WithTimeout(time.Second))
	if checked, err := other.Check(context.Background(), main); checked || err != nil {
		t.Errorf("Check without the node's binary = %v, %v; want nothing claimed", checked, err)
	}
}
