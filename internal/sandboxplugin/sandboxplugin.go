// Package sandboxplugin is the sandbox-device-plugin agent: it advertises
// the GPUs that vfio holds to the kubelet, one resource per model (or one
// alias), keeps their health current, and answers Allocate with VFIO device
// nodes, the KubeVirt environment variable and CDI device names.
package sandboxplugin

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	specs "tags.cncf.io/container-device-interface/specs-go"

	"github.com/gpu-sandbox/gpu-sandbox/internal/cli"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/cdi"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/deviceplugin"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
)

// Defaults of the agent.
const (
	DefaultNVSwitchAlias  = "nvswitch"
	DefaultPollInterval   = 250 * time.Millisecond
	DefaultRescanInterval = 30 * time.Second

	settleDelay = 50 * time.Millisecond
)

// Config is everything the agent takes from its flags and environment.
type Config struct {
	PluginDir string
	SysfsRoot string
	DevRoot   string
	CDIRoot   string
	// VFIOMode is auto, legacy or iommufd.
	VFIOMode      string
	GPUAlias      string // "" for per-model names
	NVSwitchAlias string // "" for per-model names
	Select        string
	HealthAddress string // "" serves no HTTP
	PCIIDs        string
	// PollInterval bounds how late a change that /dev does not show (a
	// driver changing in a shared group) is seen.
	PollInterval time.Duration
	// RescanInterval is how often everything is read again regardless.
	RescanInterval time.Duration

	Log *logrus.Logger
}

// Run serves until ctx ends, then stops every plugin and removes its CDI specs.
func Run(ctx context.Context, cfg Config) error {
	p, err := newPlugin(cfg)
	if err != nil {
		return err
	}
	return p.run(ctx)
}

// device is what the agent knows of one advertised device.
type device struct {
	ID       string
	Resource string
	Kind     string // CDI kind
	NUMA     int
	Path     string   // sysfs path of the primary function: PCIe position
	Nodes    []string // device nodes in the current mode
	Funcs    []string // addresses of the group's functions
	Healthy  bool
	Present  bool // seen on the last scan (held by vfio)
	passthru *vfio.Passthrough
}

// snapshot is the state Allocate reads: replaced whole, never changed.
type snapshot struct {
	mode    vfio.Mode
	devices map[string]*device
}

type plugin struct {
	cfg   Config
	log   *logrus.Logger
	sysfs *vfio.Sysfs
	sel   vfio.Selector
	namer namer
	cdi   *cdi.Writer
	m     *metrics

	state   atomic.Pointer[snapshot]
	scanned atomic.Bool

	mu      sync.Mutex // guards servers, read by /readyz
	servers map[string]*running

	// Owned by the run loop.
	known   map[string]*device
	written map[string]bool // CDI kinds on disk
	lastErr string
	wg      sync.WaitGroup
}

type running struct {
	srv    *deviceplugin.Server
	cancel context.CancelFunc
}

func newPlugin(cfg Config) (*plugin, error) {
	switch cfg.VFIOMode {
	case "auto", string(vfio.ModeLegacy), string(vfio.ModeIOMMUFD):
	default:
		return nil, cli.Usagef("--vfio-mode %q: want auto, legacy or iommufd", cfg.VFIOMode)
	}
	for flag, alias := range map[string]string{"P_GPU_ALIAS": cfg.GPUAlias, "NVSWITCH_ALIAS": cfg.NVSwitchAlias} {
		if alias != "" && !ValidResourceName(alias) {
			return nil, cli.Usagef("%s %q: not a valid resource name (letters, digits, '-', '_', '.'; at most 63)", flag, alias)
		}
	}
	if cfg.PollInterval <= 0 || cfg.RescanInterval <= 0 {
		return nil, cli.Usagef("poll and rescan intervals must be positive")
	}
	sel, err := vfio.ParseSelector(cfg.Select, true)
	if err != nil {
		return nil, &cli.UsageError{Err: err}
	}
	w, err := cdi.NewWriter(cfg.CDIRoot)
	if err != nil {
		return nil, err
	}
	p := &plugin{
		cfg: cfg, log: cfg.Log, sysfs: vfio.NewSysfs(cfg.SysfsRoot), sel: sel, cdi: w, m: newMetrics(),
		namer:   namer{names: vfio.NewNames(cfg.PCIIDs), gpuAlias: cfg.GPUAlias, nvswitchAlias: cfg.NVSwitchAlias},
		known:   map[string]*device{},
		servers: map[string]*running{},
		written: map[string]bool{},
	}
	p.state.Store(&snapshot{mode: vfio.ModeLegacy, devices: map[string]*device{}})
	return p, nil
}

func (p *plugin) run(ctx context.Context) error {
	if p.cfg.HealthAddress != "" {
		stop, err := p.serveHTTP(p.cfg.HealthAddress)
		if err != nil {
			return err
		}
		defer stop()
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watch %q: %w", p.cfg.DevRoot, err)
	}
	defer w.Close()
	p.watch(w)

	srvCtx, cancelServers := context.WithCancel(context.Background())
	defer p.shutdown(cancelServers)
	p.scan(srvCtx)
	p.scanned.Store(true)
	// What start-up parsed and built (PCI names, the first scan) is garbage
	// now: return it to the kernel at once rather than over minutes, since
	// idle RSS is what every node pays.
	go debug.FreeOSMemory()

	poll := time.NewTicker(p.cfg.PollInterval)
	defer poll.Stop()
	rescan := time.NewTicker(p.cfg.RescanInterval)
	defer rescan.Stop()
	// A vfio driver creates the device node in its probe, before the driver
	// core links device and driver in sysfs: a scan at the node's event can
	// come too early, so another follows once events have settled.
	settle := time.NewTimer(time.Hour)
	settle.Stop()
	defer settle.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.Events:
			if !ok {
				return errors.New("device watch closed")
			}
			if ev.Has(fsnotify.Create) {
				p.watch(w) // /dev/vfio or /dev/vfio/devices may just have appeared
			}
			p.scan(srvCtx)
			settle.Reset(settleDelay)
		case <-settle.C:
			p.scan(srvCtx)
		case err := <-w.Errors:
			p.log.WithError(err).Warn("device watch overflowed; reading everything again")
			p.scan(srvCtx)
		case <-poll.C:
			if p.stale() {
				p.scan(srvCtx)
			}
		case <-rescan.C:
			p.scan(srvCtx)
		}
	}
}

// watch follows the directories where vfio nodes come and go, and /dev
// itself until /dev/vfio exists. Adding a watch twice is harmless.
func (p *plugin) watch(w *fsnotify.Watcher) {
	for _, dir := range []string{p.cfg.DevRoot, filepath.Join(p.cfg.DevRoot, "vfio"), filepath.Join(p.cfg.DevRoot, "vfio", "devices")} {
		if _, err := os.Stat(dir); err == nil {
			_ = w.Add(dir)
		}
	}
}

// shutdown stops every plugin (removing their sockets) and the CDI specs.
func (p *plugin) shutdown(cancelServers context.CancelFunc) {
	cancelServers()
	p.wg.Wait()
	for kind := range p.written {
		if err := p.cdi.Remove(kind); err != nil {
			p.log.WithError(err).Warn("remove CDI spec")
		}
	}
	p.log.Info("stopped; sockets and CDI specs removed")
}

// scan reads sysfs, updates every resource's device list and the CDI specs.
func (p *plugin) scan(ctx context.Context) {
	devices, err := p.sysfs.Devices()
	if msg := fmt.Sprint(err); err != nil && msg != p.lastErr {
		// One unreadable device is skipped; say so once, not on every scan.
		p.log.WithError(err).Warn("skipping PCI devices that cannot be read")
	}
	p.lastErr = fmt.Sprint(err)
	found := vfio.FindPassthrough(devices, p.sel)
	mode, _ := vfio.ResolveMode(p.cfg.VFIOMode, p.cfg.DevRoot, found) // validated in newPlugin

	present := map[string]bool{}
	for _, pt := range found {
		d := p.known[pt.ID]
		if d == nil {
			d = &device{ID: pt.ID, Resource: p.namer.resource(pt)}
			p.log.WithFields(logrus.Fields{"device": pt.ID, "resource": d.Resource, "group": pt.IOMMUGroup,
				"numa": pt.NUMANode()}).Info("device found")
			kind, err := cdi.KindFor(d.Resource)
			if err != nil {
				p.log.WithError(err).WithField("device", pt.ID).Error("no CDI kind for the resource; device not advertised")
				continue
			}
			d.Kind = kind
			p.known[pt.ID] = d
		}
		present[pt.ID] = true
		nodes, err := pt.DevicePaths(mode)
		healthy := err == nil && pt.Ready() && p.nodesExist(nodes)
		funcs := make([]string, len(pt.Functions))
		for i, f := range pt.Functions {
			funcs[i] = f.Address
		}
		p.logHealth(d, healthy, true)
		d.NUMA, d.Path, d.Nodes, d.Funcs, d.Healthy, d.Present, d.passthru =
			pt.NUMANode(), pt.Primary.Path, nodes, funcs, healthy, true, pt
	}
	for id, d := range p.known {
		if !present[id] {
			p.logHealth(d, false, false)
			d.Healthy, d.Present, d.passthru = false, false, nil
		}
	}

	prev := p.state.Load().devices
	snap := &snapshot{mode: mode, devices: make(map[string]*device, len(p.known))}
	early, final := map[string][]deviceplugin.Device{}, map[string][]deviceplugin.Device{}
	for id, d := range p.known {
		c := *d
		snap.devices[id] = &c
		was := prev[id] != nil && prev[id].Healthy
		early[d.Resource] = append(early[d.Resource], deviceplugin.Device{ID: id, Healthy: d.Healthy && was, NUMANode: d.NUMA})
		final[d.Resource] = append(final[d.Resource], deviceplugin.Device{ID: id, Healthy: d.Healthy, NUMANode: d.NUMA})
	}
	// Bad news first: a device that failed is withdrawn at once. Good news
	// waits for the CDI specs, so that a name Allocate hands out resolves.
	for resource, list := range early {
		p.server(ctx, resource).SetDevices(list)
	}
	p.writeSpecs(snap)
	p.state.Store(snap)
	for resource, list := range final {
		p.server(ctx, resource).SetDevices(list)
	}
	p.m.update(snap)
}

func (p *plugin) logHealth(d *device, healthy, present bool) {
	entry := p.log.WithFields(logrus.Fields{"device": d.ID, "resource": d.Resource})
	switch {
	case d.Healthy && !healthy && present:
		entry.Warn("device unhealthy: its vfio node, or a function's vfio driver, is gone")
	case d.Healthy && !healthy:
		entry.Warn("device unhealthy: no longer held by vfio, or gone from sysfs")
	case !d.Healthy && healthy:
		entry.Info("device healthy")
	}
}

func (p *plugin) nodesExist(nodes []string) bool {
	for _, n := range nodes {
		if _, err := os.Stat(filepath.Join(p.cfg.DevRoot, strings.TrimPrefix(n, "/dev/"))); err != nil {
			return false
		}
	}
	return true
}

// stale reports whether what sysfs and /dev say now differs from the last
// scan for any advertised device: cheap enough to run every PollInterval.
func (p *plugin) stale() bool {
	for _, d := range p.state.Load().devices {
		if !d.Present {
			continue
		}
		healthy := p.nodesExist(d.Nodes)
		for _, addr := range d.Funcs {
			target, err := os.Readlink(filepath.Join(p.sysfs.DevicePath(addr), "driver"))
			healthy = healthy && err == nil && vfio.IsVFIODriver(filepath.Base(target))
		}
		if healthy != d.Healthy {
			return true
		}
	}
	return false
}

// server returns the plugin of a resource, starting it on first use. A
// plugin stays up while the agent runs, advertising nothing when its
// devices are gone, so the kubelet sees zero rather than a vanished plugin.
func (p *plugin) server(ctx context.Context, resource string) *deviceplugin.Server {
	p.mu.Lock()
	defer p.mu.Unlock()
	if r := p.servers[resource]; r != nil {
		return r.srv
	}
	srv := deviceplugin.New(resource, newAllocator(p, resource),
		deviceplugin.WithDir(p.cfg.PluginDir),
		deviceplugin.WithPreferrer(preferrer{p: p}),
		deviceplugin.WithEventHandler(p.onEvent))
	ctx, cancel := context.WithCancel(ctx)
	p.servers[resource] = &running{srv: srv, cancel: cancel}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		if err := srv.Run(ctx); err != nil {
			p.log.WithError(err).WithField("resource", resource).Error("device plugin stopped")
		}
	}()
	return srv
}

func (p *plugin) onEvent(e deviceplugin.Event) {
	entry := p.log.WithField("resource", e.Resource)
	switch e.Type {
	case deviceplugin.EventRegistered:
		p.m.registrations.WithLabelValues(e.Resource).Inc()
		entry.Info("registered with the kubelet")
	case deviceplugin.EventRegisterFailed, deviceplugin.EventServeFailed:
		entry.WithError(e.Err).Warnf("%s; retrying", e.Type)
	case deviceplugin.EventWaitingForKubelet:
		entry.Info("waiting for the kubelet's socket")
	case deviceplugin.EventKubeletRestarted, deviceplugin.EventSocketRemoved:
		entry.Infof("%s; registering again", e.Type)
	default:
		entry.Debug(e.Type)
	}
}

// writeSpecs writes one spec per resource and the nvidia.com/pgpu spec,
// from the devices vfio holds whole, and removes specs left without devices.
func (p *plugin) writeSpecs(snap *snapshot) {
	opts := cdi.SpecOptions{Mode: snap.mode, Sysfs: p.sysfs}
	want := map[string][]*vfio.Passthrough{}
	var all []*vfio.Passthrough
	for _, d := range snap.devices {
		if d.passthru != nil && d.passthru.Ready() {
			all = append(all, d.passthru)
			if d.Kind != cdi.PassthroughKind {
				want[d.Kind] = append(want[d.Kind], d.passthru)
			}
		}
	}
	for _, kind := range slices.Sorted(maps.Keys(want)) {
		spec, err := cdi.NewSpec(kind, want[kind], opts)
		p.write(kind, spec, err)
	}
	spec, err := cdi.NewPassthroughSpec(all, opts)
	if errors.Is(err, cdi.ErrNoDevices) {
		spec, err = nil, nil
	}
	p.write(cdi.PassthroughKind, spec, err)
	for kind := range p.written {
		if _, ok := want[kind]; !ok && kind != cdi.PassthroughKind {
			p.write(kind, nil, nil)
		}
	}
}

// write puts the spec of kind on disk, or removes it when spec is nil.
func (p *plugin) write(kind string, spec *specs.Spec, err error) {
	entry := p.log.WithField("kind", kind)
	switch {
	case err != nil:
		entry.WithError(err).Error("CDI spec not written")
	case spec == nil && p.written[kind]:
		if err := p.cdi.Remove(kind); err != nil {
			entry.WithError(err).Error("remove CDI spec")
			return
		}
		delete(p.written, kind)
		entry.Info("CDI spec removed: no devices")
	case spec != nil:
		wrote, err := p.cdi.Write(spec)
		if err != nil {
			entry.WithError(err).Error("CDI spec not written")
			return
		}
		p.written[kind] = true
		if wrote {
			entry.WithField("path", p.cdi.Path(kind)).Info("CDI spec written")
		}
	}
}

// serveHTTP serves /healthz, /readyz and /metrics.
func (p *plugin) serveHTTP(addr string) (stop func(), err error) {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--health-address %q: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if msg := p.notReady(); msg != "" {
			http.Error(w, msg, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.Handle("/metrics", p.m.handler())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(lis) }()
	p.log.WithField("address", lis.Addr().String()).Info("serving /healthz, /readyz and /metrics")
	return func() { _ = srv.Close() }, nil
}

// notReady says why the agent is not ready, "" when it is: the first scan is
// done and every plugin is registered with the kubelet.
func (p *plugin) notReady() string {
	if !p.scanned.Load() {
		return "first scan not done"
	}
	var waiting []string
	p.mu.Lock()
	for resource, r := range p.servers {
		if !r.srv.Registered() {
			waiting = append(waiting, resource)
		}
	}
	p.mu.Unlock()
	slices.Sort(waiting)
	if len(waiting) > 0 {
		return "not registered with the kubelet: " + strings.Join(waiting, ", ")
	}
	return ""
}

// allocator answers Allocate for one resource from the current snapshot.
type allocator struct {
	p        *plugin
	resource string
	env      string             // PCI_RESOURCE_NVIDIA_COM_<NAME>
	count    prometheus.Counter // allocations of this resource
}

func newAllocator(p *plugin, resource string) *allocator {
	return &allocator{p: p, resource: resource, env: envName(resource),
		count: p.m.allocations.WithLabelValues(resource)}
}

func (a *allocator) Allocate(_ context.Context, ids []string) (*pluginapi.ContainerAllocateResponse, error) {
	snap := a.p.state.Load()
	resp := &pluginapi.ContainerAllocateResponse{Envs: map[string]string{}}
	for _, id := range ids {
		d := snap.devices[id]
		if d == nil || d.Resource != a.resource || !d.Healthy {
			return nil, fmt.Errorf("device %s is not a healthy %s", id, a.resource)
		}
		for _, n := range d.Nodes {
			resp.Devices = append(resp.Devices, &pluginapi.DeviceSpec{ContainerPath: n, HostPath: n, Permissions: "mrw"})
		}
		resp.CdiDevices = append(resp.CdiDevices, &pluginapi.CDIDevice{Name: cdi.QualifiedName(d.Kind, id)})
	}
	common := vfio.CommonDevicePath(snap.mode)
	resp.Devices = append(resp.Devices, &pluginapi.DeviceSpec{ContainerPath: common, HostPath: common, Permissions: "mrw"})
	resp.Envs[a.env] = strings.Join(ids, ",")
	a.count.Inc()
	return resp, nil
}

type preferrer struct{ p *plugin }

func (pr preferrer) Preferred(available, mustInclude []string, size int) []string {
	return preferred(pr.p.state.Load().devices, available, mustInclude, size)
}
