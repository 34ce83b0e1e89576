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
	if err := NewRestarter(RestartNone, socket, "/", time.Second).WaitReady(context.Background()); err != nil {
		t.Fatalf("serving containerd: %v", err)
	}
}

func TestWaitReadyNotAnswering(t *testing.T) {
	for name, socket := range map[string]string{
		"no socket":   filepath.Join(t.TempDir(), "containerd.sock"),
		"not serving": serveHealth(t, healthpb.HealthCheckResponse_NOT_SERVING),
	} {
		t.Run(name, func(t *testing.T) {
			err := NewRestarter(RestartSignal, socket, "/", 100*time.Millisecond).WaitReady(context.Background())
			if !errors.Is(err, ErrNotAnswering) || !strings.Contains(err.Error(), socket) {
				t.Fatalf("WaitReady = %v, want ErrNotAnswering naming %s", err, socket)
			}
		})
	}
}

func TestRestartWithNothingToRestart(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "containerd.sock")
	for _, mode := range []RestartMode{RestartNone, RestartSignal} {
		// Signal: no process serves the socket, so containerd reads the
		// configuration whenever its supervisor starts it.
		restarted, err := NewRestarter(mode, socket, "/", time.Second).Restart(context.Background())
		if restarted || err != nil {
			t.Errorf("%s: Restart = %v, %v; want false, nil", mode, restarted, err)
		}
	}
	if _, err := NewRestarter("reboot", socket, "/", time.Second).Restart(context.Background()); err == nil {
		t.Error("unknown mode: no error")
	}
}
