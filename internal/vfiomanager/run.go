package vfiomanager

import (
	"context"
	"fmt"
	"io"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/gpu-sandbox/gpu-sandbox/internal/probe"
	"github.com/gpu-sandbox/gpu-sandbox/internal/readiness"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/policy"
)

// health is what run reports on /readyz and /metrics: replaced whole under
// the lock, never changed in place.
type health struct {
	mu          sync.Mutex
	ready       bool
	reason      string // why not ready
	bound       int    // groups on vfio
	failed      int    // groups that could not be bound
	pending     int    // groups to give back that a process holds
	reconciles  int
	failedTotal int // reconciles that left a group unbound
}

// pendingRetry is how soon a GPU to give back that a VM holds is looked at
// again.
const pendingRetry = 15 * time.Second

// run binds the GPUs the policy gives VMs, gives back those it no longer
// does once no VM holds them, marks the agent ready once every chosen group
// is on vfio, and keeps reconciling: on a change of the policy (once it has
// settled), on failures with backoff, and every ReconcileInterval for
// devices that appeared since. Stopping (SIGTERM on a rollout, an eviction,
// a node drain) leaves every binding as it is: bindings are node state, and
// VMs use them.
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
	changed := make(chan struct{}, 1)
	src, stopSources, err := a.startSources(ctx, changed)
	if err != nil {
		return err
	}
	defer stopSources()
	stop := func() error {
		_ = readiness.Clear(a.cfg.ReadyFile)
		a.log.Info("stopping; every binding stays (give devices back with vfio-manager unbind)")
		return nil
	}

	applied := src.current()
	a.log.WithField("policy", applied.String()).Info("GPUs for VMs")
	var candidate declared
	var settle <-chan time.Time
	failures := 0
	freed := false
	for {
		r := a.reconcile(ctx, applied)
		if ctx.Err() != nil {
			return stop()
		}
		wait := a.cfg.ReconcileInterval
		h.mu.Lock()
		h.reconciles++
		h.bound, h.failed, h.pending = r.bound, len(r.failed), len(r.pending)
		if r.err != nil || len(r.failed) > 0 {
			h.failedTotal++
		}
		h.mu.Unlock()
		switch {
		case r.err != nil || len(r.failed) > 0:
			failures++
			// Backoff from 5 s (or the interval, when shorter) to maxRetry.
			wait = min(time.Duration(1<<min(failures-1, 10))*min(5*time.Second, a.cfg.ReconcileInterval), maxRetry)
			reason := fmt.Sprintf("%d groups not bound, retrying in %s: %s", len(r.failed), wait, strings.Join(r.failed, "; "))
			if r.err != nil {
				reason = fmt.Sprintf("%v (retrying in %s)", r.err, wait)
			}
			a.setReady(h, false, reason)
		default:
			failures = 0
			if err := a.setReady(h, true, ""); err != nil {
				return err
			}
		}
		if len(r.pending) > 0 {
			wait = min(wait, pendingRetry)
		}
		if !freed {
			// The first bind's buffers are garbage now: give them back at
			// once, since idle memory is what every node pays.
			freed = true
			debug.FreeOSMemory()
		}
		timer := time.NewTimer(wait)
	wait:
		for {
			select {
			case <-ctx.Done():
				timer.Stop()
				return stop()
			case <-changed:
				d := src.current()
				switch {
				case d.same(applied):
					candidate, settle = declared{}, nil // flapped back: nothing to do
				case applied.err != nil:
					// Nothing was in force: the first readable policy, or
					// the fix of a broken one, applies at once.
					applied, settle, failures = d, nil, 0
					a.log.WithField("policy", applied.String()).Info("GPUs for VMs")
					break wait
				case !d.same(candidate):
					// Coalesce: a policy applies once it has held still for
					// PolicySettle, so a value flapping faster moves nothing.
					candidate = d
					settle = time.After(a.cfg.PolicySettle)
				}
			case <-settle:
				applied, candidate, settle, failures = candidate, declared{}, nil, 0
				a.log.WithField("policy", applied.String()).Info("GPUs for VMs: the policy changed")
				break wait
			case <-timer.C:
				break wait
			}
		}
		timer.Stop()
	}
}

// startSources starts watching where the policy comes from: the Node
// (read once before the first reconcile, then watched), and the policy
// file. Each change is told on changed.
func (a *agent) startSources(ctx context.Context, changed chan<- struct{}) (*sources, func(), error) {
	src := &sources{flag: a.cfg.VMGPUs, file: a.cfg.VMGPUsFile}
	ctx, cancel := context.WithCancel(ctx)
	var stops []func()
	stopAll := func() {
		cancel()
		for _, s := range stops {
			s()
		}
	}
	if a.cfg.VMGPUsFile != "" {
		stop, err := watchFile(ctx, a.cfg.VMGPUsFile, changed)
		if err != nil {
			a.log.WithError(err).Warn("policy file changes are seen at the next reconcile only")
		} else {
			stops = append(stops, stop)
		}
	}
	if a.node != nil {
		src.node = a.node
		rctx, rcancel := context.WithTimeout(ctx, 10*time.Second)
		if err := a.node.read(rctx); err != nil {
			a.log.WithError(err).Error("cannot read the node's policy yet; nothing changes until it is read")
		}
		rcancel()
		done := make(chan struct{})
		go func() { defer close(done); a.node.run(ctx, changed) }()
		stops = append(stops, func() { <-done })
	}
	return src, stopAll, nil
}

// reconciled is what one reconcile found and did.
type reconciled struct {
	err     error    // the policy or the node could not be read: nothing changed
	failed  []string // chosen groups that could not be bound, each with its reason
	bound   int      // chosen groups on vfio
	pending []string // groups to give back that a process holds, each with its holders
}

// reconcile brings the node to the policy: binds every chosen group that is
// not on vfio yet, and gives back the GPUs vfio-manager bound that the
// policy no longer chooses, unless a process holds them.
func (a *agent) reconcile(ctx context.Context, d declared) (r reconciled) {
	if d.err != nil {
		a.notice(ctx, true, "VFIOPolicyInvalid", d.err.Error())
		r.err = d.err
		return r
	}
	devices, err := a.devices()
	if err != nil {
		r.err = err
		return r
	}
	all, err := vfio.NewPlanAll(devices, a.sel)
	if err != nil {
		r.err = err
		return r
	}
	held, heldErr := a.m.Holders(all)
	if heldErr != nil {
		a.log.WithError(heldErr).Warn("cannot tell which groups VMs hold; nothing is given back")
	}
	heldAddr := map[string]bool{}
	for _, g := range all.Groups {
		for _, m := range g.Members {
			heldAddr[m.Address] = len(held[g.ID]) > 0
		}
	}
	gpus := policy.Gather(devices, a.sel, a.model, heldAddr)
	choice := policy.Choose(d.policy, gpus)
	// Every GPU for VMs (all, a count or a list that names them all): the
	// NVSwitches come along, as with bind --all.
	everyGPU := len(choice.VM) == len(gpus.GPUs)
	for _, u := range choice.Unmatched {
		a.notice(ctx, true, "VFIOPolicyUnmatched", fmt.Sprintf("%s names no GPU of this node: %s; the rest applies", d.source, u))
	}
	for _, w := range choice.Warnings {
		a.notice(ctx, true, "VFIOPolicyWarning", fmt.Sprintf("%s: %s", d.source, w))
	}
	if d.policy.Kind == policy.List && len(choice.VM) == 0 && len(choice.Unmatched) > 0 {
		r.err = fmt.Errorf("%s names no GPU of this node; nothing changes (write none to give every GPU back)", d.source)
		a.notice(ctx, true, "VFIOPolicyInvalid", r.err.Error())
		return r
	}
	a.notice(ctx, false, "VFIOPolicy", fmt.Sprintf("%s gives VMs %s", d.source, choice.Reason))

	// Bind what is chosen.
	plan := all
	if !everyGPU {
		if plan, err = vfio.NewPlan(devices, a.sel, choice.VM); err != nil {
			r.err = err
			return r
		}
	}
	res, err := a.bind(ctx, plan)
	if res == nil {
		r.err = err
		return r
	}
	bad := map[int]string{}
	for _, o := range res.Outcomes {
		if o.Err != nil && bad[o.Group] == "" {
			bad[o.Group] = fmt.Sprintf("group %d (%s): %v", o.Group, o.Address, rootCause(o.Err))
		}
	}
	for _, g := range plan.Groups {
		if msg, ok := bad[g.ID]; ok {
			r.failed = append(r.failed, msg)
		} else {
			r.bound++
		}
	}
	slices.Sort(r.failed)
	if n := res.Count(vfio.ActionBound); n > 0 {
		a.notice(ctx, false, "VFIOBound", fmt.Sprintf("bound to vfio for VMs: %s", outcomeList(res, vfio.ActionBound)))
	}
	if n := res.Count(vfio.ActionRefused); n > 0 {
		a.notice(ctx, true, "VFIOHostDriverBusy", fmt.Sprintf("not bound, in use through the host driver: %s", rootCauses(res, vfio.ActionRefused)))
	}

	// Give back what is no longer chosen, and NVSwitches unless every GPU is.
	want := map[string]bool{}
	for _, addr := range choice.VM {
		want[addr] = true
	}
	var back []string
	for _, m := range all.Members() {
		if m.BoundToVFIO() && (m.Role == vfio.RoleGPU && !want[m.Address] || m.Role == vfio.RoleNVSwitch && !everyGPU) {
			back = append(back, m.Address)
		}
	}
	if len(back) > 0 && heldErr == nil && ctx.Err() == nil {
		r.pending = a.giveBack(ctx, devices, back)
	}
	a.countSides(ctx)
	return r
}

// giveBack unbinds the devices and returns the groups it could not give
// back because a process holds them.
func (a *agent) giveBack(ctx context.Context, devices []*vfio.Device, addresses []string) []string {
	plan, err := vfio.NewPlan(devices, a.sel, addresses)
	if err != nil {
		a.log.WithError(err).Error("give back")
		return nil
	}
	// Each group runs to the end even when the agent is being stopped.
	res := a.m.Unbind(context.WithoutCancel(ctx), plan, vfio.UnbindOptions{})
	a.report("give back", res)
	if res.Count(vfio.ActionUnbound) > 0 {
		a.notice(ctx, false, "VFIOGivenBack", fmt.Sprintf("given back to the host, no longer for VMs: %s", outcomeList(res, vfio.ActionUnbound)))
	}
	var pending []string
	seen := map[int]bool{}
	for _, o := range res.Outcomes {
		if o.Action == vfio.ActionRefused && !seen[o.Group] {
			seen[o.Group] = true
			pending = append(pending, fmt.Sprintf("group %d (%s): %s", o.Group, o.Address, rootCause(o.Err)))
		}
	}
	if len(pending) > 0 {
		a.notice(ctx, true, "VFIOHeld", "no longer for VMs but held by one; given back once it lets go: "+strings.Join(pending, "; "))
	}
	if res.Count(vfio.ActionLeft) > 0 {
		a.notice(ctx, true, "VFIONotOurs", "no longer for VMs but bound to vfio by someone else (vfio-pci.ids=, by hand), left as it is: "+outcomeList(res, vfio.ActionLeft))
	}
	return pending
}

// countSides counts the GPUs on each side (a vfio driver, the nvidia
// driver) and labels the Node with the counts.
func (a *agent) countSides(ctx context.Context) {
	devices, err := a.devices()
	if err != nil {
		return
	}
	vm, container := 0, 0
	for _, d := range devices {
		if role, ok := a.sel.Match(d); !ok || role != vfio.RoleGPU {
			continue
		}
		switch {
		case d.BoundToVFIO():
			vm++
		case d.Driver == "nvidia":
			container++
		}
	}
	if a.reporter == nil {
		return
	}
	if err := a.reporter.counts(ctx, vm, container); err != nil {
		a.log.WithError(err).Warn("cannot label the node with the GPU counts")
	}
}

// notice logs a message and posts it as an Event on the Node, once per
// distinct message for a reason: a reconcile that finds the same thing
// again says nothing new.
func (a *agent) notice(ctx context.Context, warning bool, reason, message string) {
	if a.noticed == nil {
		a.noticed = map[string]string{}
	}
	if a.noticed[reason] == message {
		return
	}
	a.noticed[reason] = message
	entry := a.log.WithField("reason", reason)
	if warning {
		entry.Warn(message)
	} else {
		entry.Info(message)
	}
	if a.reporter != nil {
		if err := a.reporter.event(ctx, warning, reason, message); err != nil {
			a.log.WithError(err).Warn("cannot post an event")
		}
	}
}

func outcomeList(res *vfio.Result, act vfio.Action) string {
	var addrs []string
	for _, o := range res.Outcomes {
		if o.Action == act {
			addrs = append(addrs, o.Address)
		}
	}
	return strings.Join(addrs, ", ")
}

func rootCauses(res *vfio.Result, act vfio.Action) string {
	var msgs []string
	for _, o := range res.Outcomes {
		if o.Action == act && o.Err != nil && !slices.Contains(msgs, rootCause(o.Err)) {
			msgs = append(msgs, rootCause(o.Err))
		}
	}
	return strings.Join(msgs, "; ")
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

// serveHTTP serves /healthz, /readyz and /metrics.
func serveHTTP(addr string, h *health) (func(), error) {
	srv, err := probe.Listen(addr, probe.Handlers{Ready: h.notReady, Metrics: h.write})
	if err != nil {
		return nil, fmt.Errorf("--health-address %q: %w", addr, err)
	}
	return srv.Close, nil
}

// notReady says why the agent is not ready, "" when it is.
func (h *health) notReady() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ready {
		return ""
	}
	return h.reason
}

// write writes the metrics in Prometheus's text format.
func (h *health) write(w io.Writer) {
	h.mu.Lock()
	defer h.mu.Unlock()
	fmt.Fprintf(w, "# HELP gpu_sandbox_vfio_groups IOMMU groups by state after the last reconcile: chosen for VMs and bound, chosen and failed, to give back but held by a process.\n"+
		"# TYPE gpu_sandbox_vfio_groups gauge\n"+
		"gpu_sandbox_vfio_groups{state=\"bound\"} %d\ngpu_sandbox_vfio_groups{state=\"failed\"} %d\n"+
		"gpu_sandbox_vfio_groups{state=\"held_to_give_back\"} %d\n"+
		"# HELP gpu_sandbox_vfio_reconciles_total Reconciles run, and those that left a group unbound.\n"+
		"# TYPE gpu_sandbox_vfio_reconciles_total counter\n"+
		"gpu_sandbox_vfio_reconciles_total{result=\"all_bound\"} %d\ngpu_sandbox_vfio_reconciles_total{result=\"failed\"} %d\n"+
		"# HELP gpu_sandbox_vfio_ready Whether every selected group is bound.\n"+
		"# TYPE gpu_sandbox_vfio_ready gauge\ngpu_sandbox_vfio_ready %d\n",
		h.bound, h.failed, h.pending, h.reconciles-h.failedTotal, h.failedTotal, btoi(h.ready))
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
