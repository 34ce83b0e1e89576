package vfiomanager

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/fsnotify/fsnotify"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/policy"
)

// Where vfio-manager reads which GPUs are for VMs, and what it writes back.
const (
	// PolicyKey, as a Node annotation or label, declares the GPUs for VMs:
	// "all", "none", a count, or a list (an annotation: label values cannot
	// hold commas or colons).
	PolicyKey = "gpu-sandbox.io/vm-gpus"
	// WorkloadConfigLabel is the GPU Operator's: vm-passthrough means all,
	// container and vm-vgpu mean none.
	WorkloadConfigLabel = "nvidia.com/gpu.workload.config"
	// VMCountLabel and ContainerCountLabel count the GPUs on each side after
	// each change: on a vfio driver, and on the nvidia driver.
	VMCountLabel        = "gpu-sandbox.io/vm-gpus.count"
	ContainerCountLabel = "gpu-sandbox.io/container-gpus.count"
)

// declared is the policy as its sources give it at one moment.
type declared struct {
	value  string // as written
	source string // where, for messages
	policy policy.Policy
	// err means the sources cannot be read or say something malformed:
	// nothing changes until they are fixed.
	err error
}

func (d declared) String() string {
	if d.err != nil {
		return d.err.Error()
	}
	return fmt.Sprintf("%s (%s)", d.policy, d.source)
}

func (d declared) same(o declared) bool {
	return d.value == o.value && d.source == o.source && errString(d.err) == errString(o.err)
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func parseDeclared(value, source string) declared {
	p, err := policy.Parse(value)
	if err != nil {
		err = fmt.Errorf("%s: %w; nothing changes until it is fixed", source, err)
	}
	return declared{value: value, source: source, policy: p, err: err}
}

// sources reads the policy from, highest first: the Node's annotation and
// labels (with --node-policy), the policy file (--vm-gpus-file), and the
// --vm-gpus value. The first that says something decides.
type sources struct {
	flag string
	file string
	node *nodeSource // nil without --node-policy
}

// fromNode reads the policy off a Node's metadata; ok is false when the
// Node says nothing about it.
func fromNode(name string, labels, annotations map[string]string) (declared, bool) {
	if v, ok := annotations[PolicyKey]; ok {
		return parseDeclared(v, fmt.Sprintf("annotation %s on node %s", PolicyKey, name)), true
	}
	if v, ok := labels[PolicyKey]; ok {
		return parseDeclared(v, fmt.Sprintf("label %s on node %s", PolicyKey, name)), true
	}
	if v, ok := labels[WorkloadConfigLabel]; ok {
		source := fmt.Sprintf("label %s=%s on node %s", WorkloadConfigLabel, v, name)
		switch v {
		case "vm-passthrough":
			return parseDeclared("all", source), true
		case "container", "vm-vgpu":
			return parseDeclared("none", source), true
		}
		return declared{value: v, source: source,
			err: fmt.Errorf("%s: unknown workload %q (want container, vm-passthrough or vm-vgpu); nothing changes until it is fixed", source, v)}, true
	}
	return declared{}, false
}

// current resolves the sources now.
func (s *sources) current() declared {
	if s.node != nil {
		if d, ok := s.node.declared(); ok {
			return d
		}
	}
	if s.file != "" {
		b, err := os.ReadFile(s.file)
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			return declared{source: "file " + s.file, err: fmt.Errorf("policy file: %w; nothing changes until it is fixed", err)}
		default:
			if v := policyText(b); v != "" {
				return parseDeclared(v, "file "+s.file)
			}
		}
	}
	return parseDeclared(s.flag, "--vm-gpus")
}

// policyText is the value a policy file holds: its lines without comments
// (#) and blanks, joined with commas, so a list may take a line per GPU.
func policyText(b []byte) string {
	var items []string
	for line := range strings.Lines(string(b)) {
		line, _, _ = strings.Cut(line, "#")
		if line = strings.TrimSpace(line); line != "" {
			items = append(items, line)
		}
	}
	return strings.Join(items, ",")
}

// watchFile tells changed when anything in the policy file's directory
// changes: an edit, a rename into place, the ..data swap of a ConfigMap
// volume. A directory that cannot be watched leaves the periodic reconcile
// to notice.
func watchFile(ctx context.Context, path string, changed chan<- struct{}) (func(), error) {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, err
	}
	if err := w.Add(filepath.Dir(path)); err != nil {
		w.Close()
		return nil, fmt.Errorf("watch the policy file's directory: %w", err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-ctx.Done():
				return
			case _, ok := <-w.Events:
				if !ok {
					return
				}
				notify(changed)
			case _, ok := <-w.Errors:
				if !ok {
					return
				}
				notify(changed)
			}
		}
	}()
	return func() { w.Close(); wg.Wait() }, nil
}

// notify signals without blocking: one pending signal is enough.
func notify(ch chan<- struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}
