package containerd

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func TestParseRestartMode(t *testing.T) {
	for _, s := range []string{"signal", "systemd", "none"} {
		if m, err := ParseRestartMode(s); err != nil || string(m) != s {
			t.Errorf("ParseRestartMode(%q) = %q, %v", s, m, err)
		}
	}
	if _, err := ParseRestartMode("SIGHUP"); err == nil || !strings.Contains(err.Error(), `"SIGHUP"`) {
		t.Errorf("ParseRestartMode(SIGHUP) = %v, want an error naming it", err)
	}
}

// serveHealth answers the gRPC health service on a unix socket, as
// containerd does, with the given status.
func serveHealth(t *testing.T, status healthpb.HealthCheckResponse_ServingStatus) string {
	t.Helper()
	socket := filepath.Join(t.TempDir(), "containerd.sock")
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	h := health.NewServer()
	h.SetServingStatus("", status)
	healthpb.RegisterHealthServer(s, h)
	go s.Serve(l)
	t.Cleanup(s.Stop)
	return socket
}

func TestWaitReady(t *testing.T) {
	socket := serveHealth(t, healthpb.HealthCheckResponse_SERVING)
	if err := NewRestarter(RestartNone, socket, WithTimeout(time.Second)).WaitReady(context.Background()); err != nil {
		t.Fatalf("serving containerd: %v", err)
	}
}

func TestWaitReadyNotAnswering(t *testing.T) {
	for name, socket := range map[string]string{
		"no socket":   filepath.Join(t.TempDir(), "containerd.sock"),
		"not serving": serveHealth(t, healthpb.HealthCheckResponse_NOT_SERVING),
	} {
		t.Run(name, func(t *testing.T) {
			err := NewRestarter(RestartSignal, socket, WithTimeout(100*time.Millisecond)).WaitReady(context.Background())
			if !errors.Is(err, ErrNotAnswering) || !strings.Contains(err.Error(), socket) {
				t.Fatalf("WaitReady = %v, want ErrNotAnswering naming %s", err, socket)
			}
		})
	}
}

// Mode none leaves the restart to the administrator and says nothing was
// restarted; with nothing serving the socket, a signal restart is a
// failure that names the socket, never a restart that happened.
func TestRestartWithNothingToRestart(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "containerd.sock")
	if restarted, err := NewRestarter(RestartNone, socket, WithTimeout(time.Second)).Restart(context.Background()); restarted || err != nil {
		t.Errorf("none: Restart = %v, %v; want false, nil", restarted, err)
	}
	restarted, err := NewRestarter(RestartSignal, socket, WithTimeout(time.Second)).Restart(context.Background())
	if restarted || !errors.Is(err, ErrNotReachable) || !strings.Contains(err.Error(), socket) {
		t.Errorf("signal: Restart = %v, %v; want ErrNotReachable naming %s", restarted, err, socket)
	}
	if _, err := NewRestarter("reboot", socket, WithTimeout(time.Second)).Restart(context.Background()); err == nil {
		t.Error("unknown mode: no error")
	}
}

// Loaded compares when the process behind the socket started with the
// stamp: here the process is the test itself.
func TestLoaded(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "containerd.sock")
	r := NewRestarter(RestartSignal, socket, WithTimeout(time.Second))
	if _, err := r.Loaded(*now()); !errors.Is(err, ErrNotReachable) {
		t.Fatalf("nothing on the socket: %v; want ErrNotReachable", err)
	}
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	for name, tc := range map[string]struct {
		stamp Stamp
		want  bool
	}{
		"changed after start":     {*now(), false},
		"changed before start":    {Stamp{BootID: now().BootID}, true},
		"changed in another boot": {Stamp{BootID: "00000000-0000-0000-0000-000000000000", SinceBoot: now().SinceBoot}, true},
	} {
		if got, err := r.Loaded(tc.stamp); got != tc.want || err != nil {
			t.Errorf("%s: Loaded = %v, %v; want %v", name, got, err, tc.want)
		}
	}
}
