package vfiomanager

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/gpu-sandbox/gpu-sandbox/internal/readiness"
)

// health is what run reports on /readyz and /metrics: replaced whole under
// the lock, never changed in place.
type health struct {
	mu          sync.Mutex
	ready       bool
	reason      string // why not ready
	bound       int    // groups on vfio
	failed      int    // groups that could not be bound
	reconciles  int
	failedTotal int // reconciles that left a group unbound
}

// run binds what the selection names, marks the agent ready once every
// selected group is on vfio, and keeps reconciling: failed groups are tried
// again with backoff, and the node is looked at again every
// ReconcileInterval for devices that appeared since. Stopping (SIGTERM on
// a rollout, an eviction, a node drain) leaves every binding as it is:
// bindings are node state, and VMs use them. Devices go back to the host
// only through an explicit unbind.
func (a *agent) run(ctx context.Context) error {
	// A marker left by a process that crashed must not make this one look ready.
	if err := readiness.Clear(a.cfg.ReadyFile); err != nil {
		return err
	}
	h := &health{reason: "the first bind has not finished"}
	if a.cfg.HealthAddress != "" {
		stop, err := serveHTTP(a.cfg.HealthAddress, h)
		if err != nil {
			return err
		}
		defer stop()
	}
	stop := func() error {
		_ = readiness.Clear(a.cfg.ReadyFile)
		a.log.Info("stopping; every binding stays (give devices back with vfio-manager unbind)")
		return nil
	}
	failures := 0
	freed := false
	for {
		failed, bound, err := a.reconcile(ctx)
		if ctx.Err() != nil {
			return stop()
		}
		wait := a.cfg.ReconcileInterval
		h.mu.Lock()
		h.reconciles++
		h.bound, h.failed = bound, len(failed)
		if err != nil || len(failed) > 0 {
			h.failedTotal++
		}
		h.mu.Unlock()
		switch {
		case err != nil || len(failed) > 0:
			failures++
			wait = min(time.Duration(1<<min(failures-1, 10))*5*time.Second, maxRetry)
			reason := fmt.Sprintf("%d groups not bound, retrying in %s: %s", len(failed), wait, strings.Join(failed, "; "))
			if err != nil {
				reason = fmt.Sprintf("bind failed, retrying in %s: %v", wait, err)
			}
			a.setReady(h, false, reason)
		default:
			failures = 0
			if err := a.setReady(h, true, ""); err != nil {
				return err
			}
		}
		if !freed {
			// The first bind's buffers are garbage now: give them back at
			// once, since idle memory is what every node pays.
			freed = true
			debug.FreeOSMemory()
		}
		select {
		case <-ctx.Done():
			return stop()
		case <-time.After(wait):
		}
	}
}

// reconcile binds every selected group that is not on vfio yet and returns
// the groups that failed, each with its reason, and how many are bound.
func (a *agent) reconcile(ctx context.Context) (failed []string, bound int, err error) {
	plan, err := a.plan(nil)
	if err != nil {
		return nil, 0, err
	}
	res, err := a.bind(ctx, plan)
	if res == nil {
		return nil, 0, err
	}
	bad := map[int]string{}
	for _, o := range res.Outcomes {
		if o.Err != nil && bad[o.Group] == "" {
			bad[o.Group] = fmt.Sprintf("group %d (%s): %v", o.Group, o.Address, rootCause(o.Err))
		}
	}
	for _, g := range plan.Groups {
		if msg, ok := bad[g.ID]; ok {
			failed = append(failed, msg)
		} else {
			bound++
		}
	}
	slices.Sort(failed)
	return failed, bound, nil
}

// rootCause keeps an error to its first line: a group's outcome errors
// repeat the cause for every function.
func rootCause(err error) string {
	msg, _, _ := strings.Cut(err.Error(), "\n")
	return msg
}

func (a *agent) setReady(h *health, ready bool, reason string) error {
	h.mu.Lock()
	was := h.ready
	h.ready, h.reason = ready, reason
	h.mu.Unlock()
	switch {
	case ready && !was:
		if err := readiness.Mark(a.cfg.ReadyFile); err != nil {
			return err
		}
		a.log.WithField("file", a.cfg.ReadyFile).Info("every selected device is bound; ready")
	case !ready:
		_ = readiness.Clear(a.cfg.ReadyFile)
		a.log.Error("not ready: " + reason)
	}
	return nil
}

func serveHTTP(addr string, h *health) (func(), error) {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--health-address %q: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		h.mu.Lock()
		ready, reason := h.ready, h.reason
		h.mu.Unlock()
		if !ready {
			http.Error(w, "not ready: "+reason, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, _ *http.Request) {
		h.mu.Lock()
		defer h.mu.Unlock()
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		fmt.Fprintf(w, "# HELP gpu_sandbox_vfio_groups Selected IOMMU groups by state after the last reconcile.\n"+
			"# TYPE gpu_sandbox_vfio_groups gauge\n"+
			"gpu_sandbox_vfio_groups{state=\"bound\"} %d\ngpu_sandbox_vfio_groups{state=\"failed\"} %d\n"+
			"# HELP gpu_sandbox_vfio_reconciles_total Reconciles run, and those that left a group unbound.\n"+
			"# TYPE gpu_sandbox_vfio_reconciles_total counter\n"+
			"gpu_sandbox_vfio_reconciles_total{result=\"all_bound\"} %d\ngpu_sandbox_vfio_reconciles_total{result=\"failed\"} %d\n"+
			"# HELP gpu_sandbox_vfio_ready Whether every selected group is bound.\n"+
			"# TYPE gpu_sandbox_vfio_ready gauge\ngpu_sandbox_vfio_ready %d\n",
			h.bound, h.failed, h.reconciles-h.failedTotal, h.failedTotal, btoi(h.ready))
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(lis) }()
	return func() { _ = srv.Close() }, nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
