package containerd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// RestartMode says how containerd is made to read its configuration again.
type RestartMode string

// Restart modes.
const (
	// RestartSignal sends SIGHUP to the process serving the socket, which
	// ends it, and waits for its supervisor to start it again.
	RestartSignal RestartMode = "signal"
	// RestartSystemd runs "systemctl restart containerd" in the host root.
	RestartSystemd RestartMode = "systemd"
	// RestartNone leaves it to the administrator.
	RestartNone RestartMode = "none"
)

// ParseRestartMode accepts signal, systemd or none.
func ParseRestartMode(s string) (RestartMode, error) {
	switch m := RestartMode(s); m {
	case RestartSignal, RestartSystemd, RestartNone:
		return m, nil
	}
	return "", fmt.Errorf("restart mode %q: want signal, systemd or none", s)
}

// Restarter restarts containerd and waits until it answers again.
type Restarter struct {
	mode     RestartMode
	socket   string
	hostRoot string
	timeout  time.Duration
}

// NewRestarter restarts the containerd serving socket, by mode; hostRoot is
// where the host's file system is mounted ("/" on the host). timeout bounds
// the wait for containerd to answer again.
func NewRestarter(mode RestartMode, socket, hostRoot string, timeout time.Duration) *Restarter {
	return &Restarter{mode: mode, socket: socket, hostRoot: hostRoot, timeout: timeout}
}

// Restart restarts containerd. It reports false, and no error, when nothing
// was restarted: mode none, or no containerd serving the socket (it reads
// the configuration when it starts).
func (r *Restarter) Restart(ctx context.Context) (bool, error) {
	switch r.mode {
	case RestartNone:
		return false, nil
	case RestartSignal:
		pid, err := PeerPID(r.socket)
		if err != nil {
			return false, nil
		}
		if err := syscall.Kill(pid, syscall.SIGHUP); err != nil {
			return false, fmt.Errorf("restart containerd (pid %d): %w", pid, err)
		}
		// Wait for the old process to let go before asking the socket.
		deadline := time.Now().Add(r.timeout)
		for syscall.Kill(pid, 0) == nil && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
	case RestartSystemd:
		// The child chroots into the host root before it starts systemctl.
		cmd := exec.CommandContext(ctx, "/usr/bin/systemctl", "restart", "containerd")
		if filepath.Clean(r.hostRoot) != "/" {
			cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: r.hostRoot}
			cmd.Dir = "/"
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			return false, fmt.Errorf("restart containerd: systemctl: %w: %s", err, strings.TrimSpace(string(out)))
		}
	default:
		return false, fmt.Errorf("restart containerd: unknown mode %q", r.mode)
	}
	return true, r.WaitReady(ctx)
}

// WaitReady waits until containerd answers a health check on its socket.
func (r *Restarter) WaitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	var last error
	for {
		if last = Ping(ctx, r.socket); last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w on %q after %s: %w", ErrNotAnswering, r.socket, r.timeout, last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Ping asks containerd's gRPC health service whether it is serving.
func Ping(ctx context.Context, socket string) error {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		return err
	}
	if resp.Status != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("health: %s", resp.Status)
	}
	return nil
}

// PeerPID returns the PID of the process serving a unix socket, from the
// kernel's peer credentials.
func PeerPID(socket string) (int, error) {
	conn, err := net.DialTimeout("unix", socket, 2*time.Second)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	raw, err := conn.(*net.UnixConn).SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if credErr != nil {
		return 0, credErr
	}
	if cred.Pid <= 0 {
		return 0, errors.New("no peer process")
	}
	return int(cred.Pid), nil
}
