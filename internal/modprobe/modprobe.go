// Package modprobe loads kernel modules with the host's own modprobe, so that
// an agent in a container uses the modules and configuration of the node.
package modprobe

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
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
	var cmd *exec.Cmd
	if filepath.Clean(l.hostRoot) == "/" {
		cmd = exec.CommandContext(ctx, "modprobe", name)
	} else {
		cmd = exec.CommandContext(ctx, "chroot", l.hostRoot, "modprobe", name)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			return fmt.Errorf("modprobe %s in %q: %w", name, l.hostRoot, err)
		}
		return fmt.Errorf("modprobe %s in %q: %w: %s", name, l.hostRoot, err, msg)
	}
	return nil
}
