package containerd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/gpu-sandbox/gpu-sandbox/internal/boot"
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

// procRoot is where containerd's process is looked at: the host's /proc
// when the agent runs in the host's PID namespace, as restarts by signal
// need anyway.
const procRoot = "/proc"

// Restarter restarts containerd and waits until it answers again.
type Restarter struct {
	mode     RestartMode
	socket   string
	hostRoot string
	timeout  time.Duration
}

// DefaultRestartTimeout bounds the wait for containerd to answer after a
// restart, unless WithTimeout says otherwise.
const DefaultRestartTimeout = time.Minute

// RestartOption tunes a Restarter.
type RestartOption func(*Restarter)

// WithHostRoot is where the host's file system is mounted, for systemctl
// and the node's containerd binary. Default: "/", the agent runs on the
// host's.
func WithHostRoot(root string) RestartOption { return func(r *Restarter) { r.hostRoot = root } }

// WithTimeout bounds the wait for containerd to answer again. Default:
// DefaultRestartTimeout.
func WithTimeout(d time.Duration) RestartOption { return func(r *Restarter) { r.timeout = d } }

// NewRestarter restarts the containerd serving socket, by mode.
func NewRestarter(mode RestartMode, socket string, opts ...RestartOption) *Restarter {
	r := &Restarter{mode: mode, socket: socket, hostRoot: "/", timeout: DefaultRestartTimeout}
	for _, o := range opts {
		o(r)
	}
	return r
}

// Restart restarts containerd and waits until it answers. It reports false,
// and no error, only in mode none, where restarting is left to the
// administrator. A containerd that cannot be reached is an error
// (ErrNotReachable), never a restart that happened.
func (r *Restarter) Restart(ctx context.Context) (bool, error) {
	switch r.mode {
	case RestartNone:
		return false, nil
	case RestartSignal:
		pid, err := r.pid()
		if err != nil {
			return false, fmt.Errorf("restart containerd: %w", err)
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

// Check runs the host's containerd on the configuration (config dump,
// chrooted into the host root, as systemctl is), so that a configuration
// its own loader refuses is never restarted into. It checks nothing, and
// says so with false, where it cannot run that loader on the same file:
// no containerd binary in the host root (k3s embeds it), or the path does
// not name the same file on the host (a directory mounted elsewhere).
func (r *Restarter) Check(ctx context.Context, config string) (bool, error) {
	var bin string
	for _, b := range []string{"/usr/bin/containerd", "/usr/local/bin/containerd", "/bin/containerd"} {
		if _, err := os.Stat(filepath.Join(r.hostRoot, b)); err == nil {
			bin = b
			break
		}
	}
	here, err1 := os.Stat(config)
	there, err2 := os.Stat(filepath.Join(r.hostRoot, config))
	if bin == "" || err1 != nil || err2 != nil || !os.SameFile(here, there) {
		return false, nil
	}
	cmd := exec.CommandContext(ctx, bin, "--config", config, "config", "dump")
	if filepath.Clean(r.hostRoot) != "/" {
		cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: r.hostRoot}
		cmd.Dir = "/"
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return true, fmt.Errorf("%w: the node's containerd (%s) cannot load %q: %w: %s", ErrInvalidConfig, bin, config, err, strings.TrimSpace(stderr.String()))
	}
	return true, nil
}

// pid finds the process serving the socket.
func (r *Restarter) pid() (int, error) {
	pid, err := PeerPID(r.socket)
	if err != nil {
		return 0, fmt.Errorf("%w on %q: %w", ErrNotReachable, r.socket, err)
	}
	return pid, nil
}

// Loaded reports whether the containerd serving the socket started after
// the moment given (a change of its configuration, say), and so has read
// it. It fails (ErrNotReachable) when no process can be found behind the
// socket.
func (r *Restarter) Loaded(since Stamp) (bool, error) {
	pid, err := r.pid()
	if err != nil {
		return false, err
	}
	if id, err := boot.ID(); err == nil && id != since.BootID {
		return true, nil // the node booted since: everything started after
	}
	start, err := boot.ProcessStart(procRoot, pid)
	if err != nil {
		return false, fmt.Errorf("%w on %q: %w", ErrNotReachable, r.socket, err)
	}
	// Start times are kept to a tick: one that began in the tick of the
	// change counts as after it, so that a restart made right after a
	// change is never taken for one still owed.
	return start+boot.Tick > since.SinceBoot, nil
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
		// The kernel gives 0 for a peer outside our PID namespace.
		return 0, errors.New("the socket's peer credentials carry no PID: the server runs in another PID namespace (run the agent in the host's, hostPID)")
	}
	return int(cred.Pid), nil
}

// Release asks the containerd serving the socket for its version, through
// its version service, and returns its release line.
func (r *Restarter) Release(ctx context.Context) (Release, error) {
	conn, err := grpc.NewClient("unix://"+r.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return Release{}, fmt.Errorf("%w on %q: %w", ErrNotReachable, r.socket, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	var resp rawMessage
	if err := conn.Invoke(ctx, "/containerd.services.version.v1.Version/Version", &rawMessage{}, &resp,
		grpc.ForceCodecV2(rawCodec{})); err != nil {
		return Release{}, fmt.Errorf("containerd version on %q: %w", r.socket, err)
	}
	version, err := stringField(resp, 1)
	if err != nil {
		return Release{}, fmt.Errorf("containerd version on %q: %w", r.socket, err)
	}
	return ParseRelease(version)
}

// rawMessage is a protobuf message as bytes: the version service's answer
// has two string fields, which do not justify its generated package.
type rawMessage []byte

type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(*v.(*rawMessage))}, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	*v.(*rawMessage) = data.Materialize()
	return nil
}

func (rawCodec) Name() string { return "proto" }

// stringField returns the string field num of a protobuf message.
func stringField(b []byte, num protowire.Number) (string, error) {
	for len(b) > 0 {
		n, typ, l := protowire.ConsumeTag(b)
		if l < 0 {
			return "", protowire.ParseError(l)
		}
		b = b[l:]
		if n == num && typ == protowire.BytesType {
			v, l := protowire.ConsumeBytes(b)
			if l < 0 {
				return "", protowire.ParseError(l)
			}
			return string(v), nil
		}
		l = protowire.ConsumeFieldValue(n, typ, b)
		if l < 0 {
			return "", protowire.ParseError(l)
		}
		b = b[l:]
	}
	return "", fmt.Errorf("no field %d in the answer", num)
}
