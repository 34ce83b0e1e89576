// Package readiness writes and checks the marker files that tell a
// readiness probe an agent has done its work. A marker names the boot it was
// written in, so that one left on disk by an earlier boot never counts, and
// each agent clears its marker first thing at start, so that one left by a
// process that crashed never counts for the process after it.
package readiness

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/gpu-sandbox/gpu-sandbox/internal/atomicfile"
	"github.com/gpu-sandbox/gpu-sandbox/internal/boot"
)

// ErrNotReady means the marker is missing or does not count.
var ErrNotReady = errors.New("not ready")

// Clear removes the marker and what a write of it that died left behind.
func Clear(path string) error {
	_ = atomicfile.RemoveTemps(path)
	return atomicfile.Remove(path)
}

// Mark writes the marker: this boot's identity and this process's PID.
func Mark(path string) error {
	id, err := boot.ID()
	if err != nil {
		return fmt.Errorf("mark ready %q: %w", path, err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("mark ready: %w", err)
	}
	body := fmt.Sprintf("boot_id=%s\npid=%d\n", id, os.Getpid())
	if err := atomicfile.WriteFile(path, []byte(body), 0o644); err != nil {
		return fmt.Errorf("mark ready: %w", err)
	}
	return nil
}

// Check returns nil when the marker exists and was written in this boot.
func Check(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrNotReady, err)
	}
	id, err := boot.ID()
	if err != nil {
		return err
	}
	fields := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			fields[k] = v
		}
	}
	if fields["boot_id"] != id {
		return fmt.Errorf("%w: %q was written in another boot (%q, this one is %q)", ErrNotReady, path, fields["boot_id"], id)
	}
	if _, err := strconv.Atoi(fields["pid"]); err != nil {
		return fmt.Errorf("%w: %q is not a readiness marker", ErrNotReady, path)
	}
	return nil
}
