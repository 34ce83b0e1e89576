// Package vfiomanager is the vfio-manager agent: it binds the node's GPUs to
// VFIO for passthrough and gives them back.
package vfiomanager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/gpu-sandbox/gpu-sandbox/internal/cli"
	"github.com/gpu-sandbox/gpu-sandbox/internal/kubeapi"
	"github.com/gpu-sandbox/gpu-sandbox/internal/modprobe"
	"github.com/gpu-sandbox/gpu-sandbox/internal/readiness"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/policy"
)

// Defaults of the agent.
const (
	// DefaultStateDir holds one record per device vfio-manager bound,
	// naming the driver to give it back to: under /run/nvidia, which the
	// GPU Operator's DaemonSets mount from the host.
	DefaultStateDir = "/run/nvidia/vfio-manager"
	// DefaultReadyFile is written by "run" once every selected group is bound.
	DefaultReadyFile = "/run/nvidia/vfio-manager/ready"
	// DefaultReconcileInterval is how often "run" looks again for devices to bind.
	DefaultReconcileInterval = 5 * time.Minute

	// DefaultPolicySettle is how long a changed policy must hold still
	// before run applies it.
	DefaultPolicySettle = 10 * time.Second

	// maxRetry bounds the backoff of groups that failed to bind.
	maxRetry = 5 * time.Minute
)

// Config is everything the agent takes from its flags and environment.
type Config struct {
	Command   string   // bind, unbind, status or run
	All       bool     // every selected device
	DeviceIDs []string // or these addresses
	JSON      bool     // status as JSON

	SysfsRoot     string
	DevRoot       string
	HostRoot      string
	StateDir      string
	ProcRoot      string
	ReadyFile     string
	HealthAddress string // run: "" serves no HTTP
	Force         bool   // unbind devices in use, and devices without a record
	// ReconcileInterval is how often run looks again once all is bound.
	ReconcileInterval time.Duration
	// VMGPUs is the policy when neither the Node nor the file says one:
	// "all" by default (docs/vfio-manager.md, "Mixed nodes").
	VMGPUs string
	// VMGPUsFile holds a policy; a missing file says nothing.
	VMGPUsFile string
	// NodePolicy reads the policy off the Node named NodeName, through the
	// API server with the service account in ServiceAccountDir.
	NodePolicy        bool
	NodeName          string
	ServiceAccountDir string
	// PolicySettle is how long a changed policy must hold still before run
	// applies it.
	PolicySettle   time.Duration
	Select         string
	BindNVSwitches bool
	Timeout        time.Duration
	DryRun         bool
	LoadModules    bool
	PCIIDs         string // pci.ids file; "" for the system's or the built-in one

	Out io.Writer // results; logs go to Log
	Log *logrus.Logger
}

// Run carries out one command. Errors caused by the caller are cli.UsageError.
func Run(ctx context.Context, cfg Config) error {
	sel, err := vfio.ParseSelector(cfg.Select, cfg.BindNVSwitches)
	if err != nil {
		return &cli.UsageError{Err: err}
	}
	switch cfg.Command {
	case "bind", "unbind":
		if cfg.All == (len(cfg.DeviceIDs) > 0) {
			return cli.Usagef("%s: give either --all or --device-id", cfg.Command)
		}
	case "ready":
		// For readiness probes in an image without a shell.
		return readiness.Check(cfg.ReadyFile)
	case "status", "run":
		if len(cfg.DeviceIDs) > 0 {
			return cli.Usagef("%s: --device-id does not apply; it works on every selected device", cfg.Command)
		}
	case "":
		return cli.Usagef("no command: want bind, unbind, status, run or ready")
	default:
		return cli.Usagef("unknown command %q: want bind, unbind, status, run or ready", cfg.Command)
	}
	if cfg.Timeout <= 0 {
		return cli.Usagef("--timeout %s: must be positive", cfg.Timeout)
	}
	if cfg.Command == "run" && cfg.ReconcileInterval <= 0 {
		return cli.Usagef("--reconcile-interval %s: must be positive", cfg.ReconcileInterval)
	}
	if cfg.VMGPUs == "" {
		cfg.VMGPUs = "all"
	}
	if _, err := policy.Parse(cfg.VMGPUs); err != nil {
		return cli.Usagef("--vm-gpus: %v", err)
	}
	if cfg.PolicySettle < 0 {
		return cli.Usagef("--policy-settle %s: must not be negative", cfg.PolicySettle)
	}
	opts := []vfio.Option{
		vfio.WithSysfsRoot(cfg.SysfsRoot),
		vfio.WithDevRoot(cfg.DevRoot),
		vfio.WithHostRoot(cfg.HostRoot),
		vfio.WithProcRoot(cfg.ProcRoot),
		vfio.WithTimeout(cfg.Timeout),
		vfio.WithDryRun(cfg.DryRun),
	}
	if cfg.LoadModules {
		opts = append(opts, vfio.WithModuleLoader(modprobe.New(cfg.HostRoot)))
	}
	names, err := vfio.NewNames(cfg.PCIIDs)
	if err != nil {
		return cli.Usagef("--pci-ids: %v", err)
	}
	a := &agent{cfg: cfg, log: cfg.Log, m: vfio.NewManager(cfg.StateDir, opts...), sel: sel, names: names}
	if cfg.NodePolicy && (cfg.Command == "run" || cfg.Command == "status") {
		if cfg.NodeName == "" {
			return cli.Usagef("--node-policy needs the node's name: --node-name or NODE_NAME (the downward API's spec.nodeName)")
		}
		api, err := kubeapi.InCluster(cfg.ServiceAccountDir)
		if err != nil {
			return fmt.Errorf("--node-policy: %w", err)
		}
		a.node = &nodeSource{api: api, name: cfg.NodeName}
		if cfg.Command == "run" {
			a.reporter = &nodeReporter{api: api, node: a.node}
		}
	}

	if cfg.Command == "run" {
		return a.run(ctx)
	}
	plan, err := a.plan(cfg.DeviceIDs)
	if err != nil {
		return err
	}
	switch cfg.Command {
	case "bind":
		_, err = a.bind(ctx, plan)
		return err
	case "unbind":
		return a.unbind(plan)
	}
	return a.status(ctx, plan)
}

type agent struct {
	cfg   Config
	log   *logrus.Logger
	m     *vfio.Manager
	sel   vfio.Selector
	names *vfio.Names

	node     *nodeSource   // with --node-policy
	reporter *nodeReporter // run with --node-policy
	noticed  map[string]string
}

// model is the name part of a GPU's resource, as the device plugin gives it.
func (a *agent) model(d *vfio.Device) string {
	return vfio.ResourceName(a.names.Name(d.Vendor, d.DeviceID), d.DeviceID, vfio.RoleGPU)
}

// devices reads the node's PCI functions; one that cannot be read is
// skipped with a warning rather than stopping the others.
func (a *agent) devices() ([]*vfio.Device, error) {
	devices, err := a.m.Sysfs().Devices()
	if devices == nil && err != nil {
		return nil, err
	}
	for _, e := range unjoin(err) {
		if e != nil {
			a.log.WithError(e).Warn("skipping a PCI device that cannot be read")
		}
	}
	return devices, nil
}

func (a *agent) plan(addresses []string) (*vfio.Plan, error) {
	devices, err := a.devices()
	if err != nil {
		return nil, err
	}
	var plan *vfio.Plan
	if len(addresses) == 0 { // --all, or status
		plan, err = vfio.NewPlanAll(devices, a.sel)
	} else {
		plan, err = vfio.NewPlan(devices, a.sel, addresses)
	}
	if err != nil {
		if errors.Is(err, vfio.ErrInvalidAddress) || errors.Is(err, vfio.ErrDeviceNotFound) || errors.Is(err, vfio.ErrNotSelected) {
			return nil, &cli.UsageError{Err: err}
		}
		return nil, err
	}
	return plan, nil
}

func (a *agent) bind(ctx context.Context, plan *vfio.Plan) (*vfio.Result, error) {
	if len(plan.Groups) == 0 {
		if a.cfg.Command != "run" {
			fmt.Fprintf(a.cfg.Out, "no device matches selector %s\n", a.sel)
		}
		return &vfio.Result{}, nil
	}
	res, err := a.m.Bind(ctx, plan)
	if err != nil {
		return nil, fmt.Errorf("bind: %w", err)
	}
	a.report("bind", res)
	if err := res.Err(); err != nil {
		return res, fmt.Errorf("bind: %s:\n%w", summary(res), err)
	}
	return res, nil
}

func (a *agent) unbind(plan *vfio.Plan) error {
	// Unbinding runs to the end even when the agent is being stopped: a
	// device left half-way helps nobody.
	res := a.m.Unbind(context.Background(), plan, vfio.UnbindOptions{Force: a.cfg.Force})
	a.report("unbind", res)
	if err := res.Err(); err != nil {
		return fmt.Errorf("unbind: %s:\n%w", summary(res), err)
	}
	return nil
}

func (a *agent) report(op string, res *vfio.Result) {
	for _, o := range res.Outcomes {
		entry := a.log.WithFields(logrus.Fields{
			"device": o.Address, "group": o.Group, "role": o.Role, "from": o.From, "to": o.To,
		})
		switch {
		case (o.Action == vfio.ActionRefused || o.Action == vfio.ActionLeft) && a.cfg.Command == "run":
			// run says it once as a notice, and tries again.
			entry.WithError(o.Err).Debugf("%s: %s", op, o.Action)
		case o.Err != nil:
			entry.WithError(o.Err).Errorf("%s: %s", op, o.Action)
		case o.Warning != "":
			entry.Warnf("%s: %s: %s", op, o.Action, o.Warning)
		case o.Action == vfio.ActionUnchanged:
			entry.Debugf("%s: %s", op, o.Action)
		default:
			entry.Infof("%s: %s", op, o.Action)
		}
	}
	if a.cfg.Command == "run" && res.Count(vfio.ActionBound)+res.Count(vfio.ActionUnbound)+res.Count(vfio.ActionFailed) == 0 {
		return // run looks again every few minutes; say so only when something changed
	}
	fmt.Fprintf(a.cfg.Out, "%s: %s\n", op, summary(res))
}

func summary(res *vfio.Result) string {
	var parts []string
	for _, act := range []vfio.Action{vfio.ActionBound, vfio.ActionUnbound, vfio.ActionPlanned,
		vfio.ActionUnchanged, vfio.ActionLeft, vfio.ActionRefused, vfio.ActionFailed, vfio.ActionSkipped} {
		var addrs []string
		for _, o := range res.Outcomes {
			if o.Action == act {
				addrs = append(addrs, o.Address)
			}
		}
		if len(addrs) > 0 {
			parts = append(parts, fmt.Sprintf("%d %s (%s)", len(addrs), act, strings.Join(addrs, ", ")))
		}
	}
	if len(parts) == 0 {
		return "nothing to do"
	}
	return strings.Join(parts, "; ")
}

// statusEntry is one element of "status --json".
type statusEntry struct {
	Address    string `json:"address"`
	Vendor     string `json:"vendor"`
	Device     string `json:"device"`
	Class      string `json:"class"`
	Name       string `json:"name"`
	Role       string `json:"role"`
	Driver     string `json:"driver"`
	IOMMUGroup int    `json:"iommuGroup"`
	NUMANode   int    `json:"numaNode"`
	VFIODevice string `json:"vfioDevice"`
	// InUseBy names the processes holding the device's group open.
	InUseBy []string `json:"inUseBy,omitempty"`
	// For says whose a GPU is by the policy: "vm" or "host"; absent for
	// other roles, and when the policy cannot be read.
	For string `json:"for,omitempty"`
	// Pending says what run still has to do to follow the policy: "bind",
	// "give back", or "give back once no process holds it".
	Pending string `json:"pending,omitempty"`
	// SharedWith lists the other selected devices of the device's IOMMU
	// group (GPUs behind a switch without ACS): VFIO gives the group to
	// one VM whole, and the device plugin advertises it as one device.
	SharedWith []string `json:"sharedWith,omitempty"`
}

func (a *agent) status(ctx context.Context, plan *vfio.Plan) error {
	names := a.names
	held, err := a.m.Holders(plan)
	if err != nil {
		a.log.WithError(err).Warn("cannot tell which devices are in use")
	}
	// What the policy says, as run would apply it now.
	src := &sources{flag: a.cfg.VMGPUs, file: a.cfg.VMGPUsFile, node: a.node}
	if a.node != nil {
		_ = a.node.read(ctx) // an error is the policy's
	}
	d := src.current()
	forVM := map[string]bool{}
	var choice policy.Choice
	if d.err == nil {
		heldAddr := map[string]bool{}
		var devices []*vfio.Device
		for _, m := range plan.Members() {
			heldAddr[m.Address] = len(held[m.IOMMUGroup]) > 0
			devices = append(devices, m.Device)
		}
		if all, err := a.devices(); err == nil {
			devices = all // NVSwitches count for the reason even when not selected
		}
		choice = policy.Choose(d.policy, policy.Gather(devices, a.sel, a.model, heldAddr))
		for _, addr := range choice.VM {
			forVM[addr] = true
		}
	}
	entries := []statusEntry{}
	selected := map[int][]string{} // group → its selected devices
	for _, m := range plan.Members() {
		if m.Role != vfio.RoleCompanion && m.IOMMUGroup >= 0 {
			selected[m.IOMMUGroup] = append(selected[m.IOMMUGroup], m.Address)
		}
	}
	for _, m := range plan.Members() {
		e := statusEntry{
			Address: m.Address, Vendor: fmt.Sprintf("%04x", m.Vendor), Device: fmt.Sprintf("%04x", m.Device.DeviceID),
			Class: fmt.Sprintf("0x%06x", m.Class), Name: names.Name(m.Vendor, m.Device.DeviceID),
			Role: string(m.Role), Driver: m.Driver, IOMMUGroup: m.IOMMUGroup, NUMANode: m.NUMANode,
		}
		switch {
		case !m.BoundToVFIO() || m.IOMMUGroup < 0:
		case a.m.Sysfs().GroupReady(m.IOMMUGroup):
			// The node's name for the group, whatever root this agent reads /dev under.
			e.VFIODevice = fmt.Sprintf("/dev/vfio/%d", m.IOMMUGroup)
		case m.VFIODevice != "":
			e.VFIODevice = "/dev/vfio/devices/" + m.VFIODevice // an iommufd-only kernel
		}
		for _, h := range held[m.IOMMUGroup] {
			e.InUseBy = append(e.InUseBy, fmt.Sprintf("%d (%s)", h.PID, h.Command))
		}
		if sel := selected[m.IOMMUGroup]; len(sel) > 1 && m.Role != vfio.RoleCompanion {
			e.SharedWith = slices.DeleteFunc(slices.Clone(sel), func(a string) bool { return a == m.Address })
		}
		if d.err == nil && m.Role == vfio.RoleGPU {
			e.For = "host"
			if forVM[m.Address] {
				e.For = "vm"
			}
			switch {
			case e.For == "vm" && !m.BoundToVFIO():
				e.Pending = "bind"
			case e.For == "host" && m.BoundToVFIO() && len(e.InUseBy) > 0:
				e.Pending = "give back once no process holds it"
			case e.For == "host" && m.BoundToVFIO():
				e.Pending = "give back"
			}
		}
		entries = append(entries, e)
	}
	if a.cfg.JSON {
		enc := json.NewEncoder(a.cfg.Out)
		enc.SetIndent("", "  ")
		return enc.Encode(entries)
	}
	w := tabwriter.NewWriter(a.cfg.Out, 0, 4, 2, ' ', 0)
	if d.err != nil {
		fmt.Fprintf(w, "policy: %v\n\n", d.err)
	} else {
		fmt.Fprintf(w, "policy: %s, from %s: %s\n", d.policy, d.source, choice.Reason)
		for _, u := range choice.Unmatched {
			fmt.Fprintf(w, "warning: names no GPU: %s\n", u)
		}
		for _, warning := range choice.Warnings {
			fmt.Fprintf(w, "warning: %s\n", warning)
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintln(w, "ADDRESS\tIDS\tROLE\tGROUP\tNUMA\tDRIVER\tVFIO\tIN USE BY\tFOR\tPENDING\tNAME")
	for _, e := range entries {
		group := strconv.Itoa(e.IOMMUGroup)
		if len(e.SharedWith) > 0 {
			group += "*"
		}
		fmt.Fprintf(w, "%s\t%s:%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\n", e.Address, e.Vendor, e.Device, e.Role,
			group, e.NUMANode, orDash(e.Driver), orDash(e.VFIODevice), orDash(strings.Join(e.InUseBy, ",")),
			orDash(e.For), orDash(e.Pending), e.Name)
	}
	for _, g := range slices.Sorted(maps.Keys(selected)) {
		if sel := selected[g]; len(sel) > 1 {
			fmt.Fprintf(w, "\n* group %d carries %d devices (%s): no ACS between them, so VFIO gives them to one VM together, and the device plugin advertises them as one device\n",
				g, len(sel), strings.Join(sel, ", "))
		}
	}
	for _, g := range plan.Groups {
		if g.Err != nil {
			fmt.Fprintf(w, "\nwarning: %v\n", g.Err)
		}
	}
	return w.Flush()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}
