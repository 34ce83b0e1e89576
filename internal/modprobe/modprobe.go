// Package modprobe loads kernel modules with the host's own modprobe, so that
// an agent in a container uses the modules and configuration of the node.
package modprobe

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
)

// Loader runs modprobe inside the host root file system.
type Loader struct {
	hostRoot string
}

// New returns a Loader for the host root mounted at hostRoot ("/" when the
// agent runs on the host itself).
func New(hostRoot string) *Loader {
	return &Loader{hostRoot: hostRoot}
}

// LoadModule loads the module and its dependencies.
func (l *Loader) LoadModule(ctx context.Context, name string) error {
	cmd, err := HostCommand(ctx, l.hostRoot, "modprobe", name)
	if err != nil {
		return fmt.Errorf("modprobe %s: %w", name, err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		if msg := strings.TrimSpace(stderr.String()); msg != "" {
			return fmt.Errorf("modprobe %s in %q: %w: %s", name, l.hostRoot, err, msg)
		}
		return fmt.Errorf("modprobe %s in %q: %w", name, l.hostRoot, err)
	}
	return nil
}

// HostCommand prepares a program of the host to run inside the host root:
// the child chroots before it starts, so the agent's image needs neither
// the program nor a chroot binary (the images are built from scratch).
func HostCommand(ctx context.Context, hostRoot, program string, args ...string) (*exec.Cmd, error) {
	var path string
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"} {
		if fi, err := os.Stat(filepath.Join(hostRoot, dir, program)); err == nil && !fi.IsDir() {
			path = filepath.Join(dir, program)
			break
		}
	}
	if path == "" {
		return nil, fmt.Errorf("%s not found in the host root %q", program, hostRoot)
	}
	cmd := exec.CommandContext(ctx, path, args...)
	if filepath.Clean(hostRoot) != "/" {
		cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: hostRoot}
		cmd.Dir = "/"
	}
	return cmd, nil
}
