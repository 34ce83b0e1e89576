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
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	specs "tags.cncf.io/container-device-interface/specs-go"

	"github.com/gpu-sandbox/gpu-sandbox/internal/cli"
	"github.com/gpu-sandbox/gpu-sandbox/internal/probe"
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
	// bookkeepDelay is how long the bookkeeping of a node gone waits for
	// the news to reach the kubelet.
	bookkeepDelay = 2 * time.Millisecond
	// specsHoldMax bounds how long the first CDI specs wait for the
	// kubelet to take every resource.
	specsHoldMax = time.Second
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
	// IdleGCPercent, when positive, is the garbage collector's percentage
	// (GOGC) once start-up is over; start-up runs at the process's own.
	IdleGCPercent int

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
	Resource string // also the CDI kind: Allocate names Resource=ID
	// claimed is the kubelet's assignment of this device to a pod under
	// another plugin's ID (NVIDIA's group number): kept Unhealthy while
	// the checkpoint holds it, so that no second pod gets it.
	claimed string
	NUMA    int
	Path    string   // sysfs path of the primary function: PCIe position
	Nodes   []string // device nodes in the current mode
	// hostNodes are Nodes under --dev-root, as /dev events name them.
	hostNodes []string
	// driverLinks are the sysfs driver links of Funcs, read by the poll.
	driverLinks []string
	Funcs       []string // addresses of the group's functions
	Healthy     bool
	Present     bool // seen on the last scan (held by vfio)
	passthru    *vfio.Passthrough
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
	namer *namer
	cdi   *cdi.Writer
	m     *metrics

	vfioDir, iommuPath string // /dev/vfio and /dev/iommu under --dev-root

	state   atomic.Pointer[snapshot]
	scanned atomic.Bool

	mu      sync.Mutex // guards servers, read by /readyz
	servers map[string]*running

	registered chan struct{} // a resource registered; never blocks the sender

	// Owned by the run loop.
	specsHeld bool      // no CDI spec written yet: good news held back
	gone      []*device // nodes gone, bookkeeping not yet done
	bookkeep  *time.Timer
	known     map[string]*device
	written   map[string]bool // CDI kinds on disk
	lastErr   string
	lastCkErr string // the checkpoint's last read error, said once
	wg        sync.WaitGroup
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
		if alias != "" && !vfio.ValidResourceName(alias) {
			return nil, cli.Usagef("%s %q: not a valid resource name and CDI class (at most 63 letters, digits, '-', '_' and '.', starting with a letter)", flag, alias)
		}
	}
	if cfg.PollInterval <= 0 || cfg.RescanInterval <= 0 {
		return nil, cli.Usagef("poll and rescan intervals must be positive")
	}
	sel, err := vfio.ParseSelector(cfg.Select, true)
	if err != nil {
		return nil, &cli.UsageError{Err: err}
	}
	if _, err := vfio.NewNames(cfg.PCIIDs); err != nil {
		return nil, cli.Usagef("--pci-ids: %v", err)
	}
	w, err := cdi.NewWriter(cfg.CDIRoot)
	if err != nil {
		return nil, err
	}
	p := &plugin{
		cfg: cfg, log: cfg.Log, sysfs: vfio.NewSysfs(cfg.SysfsRoot), sel: sel, cdi: w, m: newMetrics(),
		vfioDir: filepath.Join(cfg.DevRoot, "vfio"), iommuPath: filepath.Join(cfg.DevRoot, "iommu"),
		namer: newNamer(cfg.PCIIDs, cfg.GPUAlias, cfg.NVSwitchAlias),
		known: map[string]*device{}, registered: make(chan struct{}, 1),
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
	// Registering goes first. Written now, the CDI specs (two YAML
	// encodings and two fsyncs each) would hold the processors that the
	// registrations' round trips with the kubelet wait for: about 5 ms
	// more to registered. The specs, and with them the devices' good news,
	// follow once every resource is registered, or after specsHoldMax
	// without a kubelet.
	p.specsHeld = true
	p.scan(srvCtx)
	p.scanned.Store(true)
	hold := time.NewTimer(specsHoldMax)
	defer hold.Stop()
	p.bookkeep = time.NewTimer(time.Hour)
	p.bookkeep.Stop()
	defer p.bookkeep.Stop()
	release := func() {
		if p.specsHeld {
			p.settleGone(srvCtx)
			p.specsHeld = false
			p.publish(srvCtx, p.state.Load().mode, nil, true)
			// Start-up is over. What it parsed and built (PCI names,
			// scans, specs, connections) is garbage now: return it to
			// the kernel at once rather than over minutes, since idle
			// RSS is what every node pays. Not before: the collection
			// would take the processors the registrations wait for.
			go debug.FreeOSMemory()
			if p.cfg.IdleGCPercent > 0 {
				debug.SetGCPercent(p.cfg.IdleGCPercent)
			}
		}
	}
	if p.notReady() == "" {
		release() // nothing to register
	}

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
			if ev.Name == p.checkpointPath() {
				settle.Reset(settleDelay) // the kubelet assigned or released devices
				continue
			}
			if !p.vfioPath(ev.Name) {
				continue // the rest of /dev: ttys, disks, ...
			}
			// The event says which node came or went: apply that to the
			// devices it names at once, and leave reading everything
			// again to the settle timer.
			p.nodeEvent(srvCtx, ev)
			if ev.Has(fsnotify.Create) && p.watchedDir(ev.Name) {
				p.watch(w) // /dev/vfio or /dev/vfio/devices has just appeared
			}
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
		case <-p.registered:
			switch {
			case p.notReady() != "":
			case p.specsHeld:
				release()
			default:
				// Registered again, the kubelet having restarted: the
				// old connections and their buffers are garbage. As
				// after start, hand them back now: left to the runtime,
				// a node kept about 4 MiB more for good after one
				// restart (RssAnon 3.6 to 7.4 MiB in make bench's storm).
				go debug.FreeOSMemory()
			}
		case <-hold.C:
			release()
		case <-p.bookkeep.C:
			p.settleGone(srvCtx)
		}
	}
}

// watch follows the directories where vfio nodes come and go, and /dev
// itself for /dev/vfio and /dev/iommu. Adding a watch twice is harmless.
func (p *plugin) watch(w *fsnotify.Watcher) {
	// The plugin directory, for the kubelet's checkpoint.
	for _, dir := range []string{p.cfg.DevRoot, filepath.Join(p.cfg.DevRoot, "vfio"), filepath.Join(p.cfg.DevRoot, "vfio", "devices"), p.cfg.PluginDir} {
		if _, err := os.Stat(dir); err == nil {
			_ = w.Add(dir)
		}
	}
}

// watchedDir reports whether path is one of the directories watch follows
// below /dev.
func (p *plugin) watchedDir(path string) bool {
	return path == p.vfioDir || path == filepath.Join(p.vfioDir, "devices")
}

// vfioPath reports whether a path under the watched part of /dev can matter
// to the devices: /dev/vfio and everything in it, and /dev/iommu (which
// decides the mode in auto).
func (p *plugin) vfioPath(path string) bool {
	return under(path, p.vfioDir) || path == p.iommuPath
}

// under reports whether path is dir or below it.
func under(path, dir string) bool {
	return strings.HasPrefix(path, dir) && (len(path) == len(dir) || path[len(dir)] == '/')
}

// shutdown stops every plugin, removing their sockets.
//
// The CDI specs stay: containers being created, and Kata VMs being cold
// plugged, resolve the names Allocate handed out until the next plugin
// takes over (and rewrites the same bytes). "sandbox-device-plugin
// uninstall" removes them.
func (p *plugin) shutdown(cancelServers context.CancelFunc) {
	cancelServers()
	p.wg.Wait()
	p.log.Info("stopped; sockets removed, CDI specs kept for the next plugin")
}

// scan reads sysfs, updates every resource's device list and the CDI specs.
func (p *plugin) scan(ctx context.Context) {
	p.settleGone(ctx)
	devices, err := p.sysfs.Devices()
	if msg := fmt.Sprint(err); err != nil && msg != p.lastErr {
		// One unreadable device is skipped; say so once, not on every scan.
		p.log.WithError(err).Warn("skipping PCI devices that cannot be read")
	}
	p.lastErr = fmt.Sprint(err)
	found := vfio.FindPassthrough(devices, p.sel)
	mode, _ := vfio.ResolveMode(p.cfg.VFIOMode, p.cfg.DevRoot, found) // validated in newPlugin

	claims := p.foreignClaims(found)
	present := map[string]bool{}
	for _, pt := range found {
		d := p.known[pt.ID]
		if d == nil {
			d = &device{ID: pt.ID, Resource: p.namer.resource(pt)}
			log := p.log.WithFields(logrus.Fields{"device": pt.ID, "resource": d.Resource, "group": pt.IOMMUGroup,
				"numa": pt.NUMANode()})
			log.Info("device found")
			if pt.Shared() {
				var carried []string
				for _, f := range pt.Selected {
					carried = append(carried, f.Address)
				}
				log.WithField("carries", strings.Join(carried, ",")).Warnf(
					"IOMMU group %d holds %d devices (no ACS between them): VFIO gives the group whole, so they are one device of %s, and a pod asking for one gets %d",
					pt.IOMMUGroup, len(pt.Selected), d.Resource, len(pt.Selected))
			}
			p.known[pt.ID] = d
		}
		present[pt.ID] = true
		nodes, err := pt.DevicePaths(mode)
		claim := ""
		if a, ok := claims[pt.ID]; ok {
			claim = a.String()
		}
		if claim != d.claimed {
			if claim != "" {
				p.log.WithFields(logrus.Fields{"device": pt.ID, "resource": d.Resource, "assigned": claim}).Warn(
					"the kubelet's checkpoint assigns this device under another plugin's ID: kept Unhealthy until that pod is gone")
			} else {
				p.log.WithFields(logrus.Fields{"device": pt.ID, "resource": d.Resource, "assigned": d.claimed}).Info(
					"the kubelet's checkpoint no longer assigns this device under another plugin's ID")
			}
			d.claimed = claim
		}
		hostNodes := make([]string, len(nodes))
		for i, n := range nodes {
			hostNodes[i] = p.hostPath(n)
		}
		healthy := err == nil && pt.Ready() && nodesExist(hostNodes) && claim == ""
		funcs := make([]string, len(pt.Functions))
		links := make([]string, len(pt.Functions))
		for i, f := range pt.Functions {
			funcs[i] = f.Address
			links[i] = filepath.Join(p.sysfs.DevicePath(f.Address), "driver")
		}
		p.logHealth(d, healthy, true, d.Healthy)
		d.NUMA, d.Path, d.Nodes, d.hostNodes, d.Funcs, d.driverLinks, d.Healthy, d.Present, d.passthru =
			pt.NUMANode(), pt.Primary.Path, nodes, hostNodes, funcs, links, healthy, true, pt
	}
	p.namer.forget()
	for id, d := range p.known {
		if !present[id] {
			p.logHealth(d, false, false, d.Healthy)
			d.Healthy, d.Present, d.passthru = false, false, nil
		}
	}

	p.publish(ctx, mode, nil, !p.specsHeld)
}

// nodeEvent applies what a /dev event says to the devices whose nodes it
// names, without reading sysfs. A node gone makes them unhealthy, sent at
// once. A node back makes them healthy again where the rest of what the
// last scan saw still holds (every function on a vfio driver, every node
// there), sent once the CDI specs are written: a node re-created may have
// a new device number. What an event cannot settle (a node no device had, a
// driver not linked yet) waits for the scan that the settle timer runs.
func (p *plugin) nodeEvent(ctx context.Context, ev fsnotify.Event) {
	gone := ev.Has(fsnotify.Remove) || ev.Has(fsnotify.Rename)
	if !gone && !ev.Has(fsnotify.Create) {
		return
	}
	var changed []*device
	for _, d := range p.known {
		if !d.Present || d.Healthy != gone || !names(d, ev.Name) {
			continue
		}
		if !gone && !(d.claimed == "" && d.passthru.Ready() && nodesExist(d.hostNodes) && onVFIO(d.driverLinks)) {
			continue
		}
		changed = append(changed, d)
	}
	if len(changed) == 0 {
		return
	}
	if gone {
		// Bad news with nothing before it: the lists the kubelet sees
		// change first. The bookkeeping (the snapshot Allocate reads,
		// metrics, logs) waits a moment: done now, it would take the
		// processor from the stream sending the news and from the kubelet
		// reading it. The servers refuse the devices already.
		for _, d := range changed {
			p.server(ctx, d.Resource).SetHealth(false, d.ID)
			d.Healthy = false
		}
		p.gone = append(p.gone, changed...)
		p.bookkeep.Reset(bookkeepDelay)
		return
	}
	p.settleGone(ctx)
	resources := map[string]bool{}
	for _, d := range changed {
		d.Healthy = !gone
		resources[d.Resource] = true
	}
	p.publish(ctx, p.state.Load().mode, resources, !gone && !p.specsHeld)
	// Logged once the kubelet has the news, not before.
	for _, d := range changed {
		p.logHealth(d, !gone, true, gone)
	}
}

// settleGone does the bookkeeping that nodeEvent left for devices whose node
// went: the snapshot, metrics and logs. Every other publish does it first,
// so that it starts from what the kubelet was told.
func (p *plugin) settleGone(ctx context.Context) {
	if len(p.gone) == 0 {
		return
	}
	resources := map[string]bool{}
	for _, d := range p.gone {
		resources[d.Resource] = true
	}
	p.publish(ctx, p.state.Load().mode, resources, false)
	for _, d := range p.gone {
		p.logHealth(d, false, true, true)
	}
	p.gone = nil
}

// names reports whether path is one of the device's nodes or a directory
// above them.
func names(d *device, path string) bool {
	for _, n := range d.hostNodes {
		if under(n, path) {
			return true
		}
	}
	return false
}

// publish makes what p.known says the state that Allocate reads and the
// kubelet sees, for the given resources (nil: all). Bad news goes out
// first: a device that failed is withdrawn at once. Good news waits for the
// CDI specs, so that a name Allocate hands out resolves: it is sent once
// they are written, and held back (the device stays unhealthy to the
// kubelet and to Allocate) by a publish that does not write them.
func (p *plugin) publish(ctx context.Context, mode vfio.Mode, resources map[string]bool, writeSpecs bool) {
	prev := p.state.Load().devices
	snap := &snapshot{mode: mode, devices: make(map[string]*device, len(p.known))}
	early, final := map[string][]deviceplugin.Device{}, map[string][]deviceplugin.Device{}
	good := false
	for id, d := range p.known {
		was := prev[id] != nil && prev[id].Healthy
		c := *d
		if !writeSpecs {
			c.Healthy = d.Healthy && was
		}
		snap.devices[id] = &c
		if resources != nil && !resources[d.Resource] {
			continue
		}
		good = good || d.Healthy && !was
		early[d.Resource] = append(early[d.Resource], deviceplugin.Device{ID: id, Healthy: d.Healthy && was, NUMANodes: numaNodes(d.NUMA)})
		final[d.Resource] = append(final[d.Resource], deviceplugin.Device{ID: id, Healthy: d.Healthy, NUMANodes: numaNodes(d.NUMA)})
	}
	good = good && writeSpecs
	if !good {
		// Allocate refuses what failed before the kubelet hears of it.
		p.state.Store(snap)
	}
	for resource, list := range early {
		p.server(ctx, resource).SetDevices(list)
	}
	if writeSpecs {
		p.writeSpecs(snap)
	}
	if good {
		p.state.Store(snap)
		for resource, list := range final {
			p.server(ctx, resource).SetDevices(list)
		}
	}
	p.m.update(snap)
}

// logHealth logs a device's change from was to healthy.
func (p *plugin) logHealth(d *device, healthy, present, was bool) {
	entry := p.log.WithFields(logrus.Fields{"device": d.ID, "resource": d.Resource})
	switch {
	case was && !healthy && present:
		entry.Warn("device unhealthy: its vfio node, or a function's vfio driver, is gone")
	case was && !healthy:
		entry.Warn("device unhealthy: no longer held by vfio, or gone from sysfs")
	case !was && healthy:
		entry.Info("device healthy")
	}
}

// foreignClaims reads the kubelet's checkpoint for devices it assigned
// under another plugin's IDs, for the resources the found devices have.
// An unreadable checkpoint is said once and claims nothing.
func (p *plugin) foreignClaims(found []*vfio.Passthrough) map[string]assignment {
	assigned, err := readCheckpoint(p.checkpointPath())
	if msg := fmt.Sprint(err); err != nil && msg != p.lastCkErr {
		p.log.WithError(err).Warn("cannot read the kubelet's checkpoint: devices assigned under another plugin's IDs are not recognised")
	}
	p.lastCkErr = fmt.Sprint(err)
	if len(assigned) == 0 {
		return nil
	}
	resources := map[string]bool{}
	for _, pt := range found {
		if d := p.known[pt.ID]; d != nil {
			resources[d.Resource] = true
		} else {
			resources[p.namer.resource(pt)] = true
		}
	}
	return foreign(assigned, resources, found)
}

// numaNodes is the topology of a device on NUMA node n, -1 for none.
func numaNodes(n int) []int {
	if n < 0 {
		return nil
	}
	return []int{n}
}

// hostPath is where a device node (/dev/vfio/22) is under --dev-root.
func (p *plugin) hostPath(node string) string {
	return filepath.Join(p.cfg.DevRoot, strings.TrimPrefix(node, "/dev/"))
}

// nodesExist reports whether every device node (under --dev-root) exists.
func nodesExist(hostNodes []string) bool {
	var st unix.Stat_t
	for _, n := range hostNodes {
		if unix.Stat(n, &st) != nil {
			return false
		}
	}
	return true
}

// onVFIO reports whether every function, by its sysfs driver link, is
// bound to a vfio driver now.
func onVFIO(driverLinks []string) bool {
	for _, link := range driverLinks {
		driver, err := vfio.ReadLinkBase(link)
		if err != nil || !vfio.IsVFIODriver(driver) {
			return false
		}
	}
	return true
}

// stale reports whether what sysfs and /dev say now differs from the last
// scan for any advertised device: cheap enough to run every PollInterval.
func (p *plugin) stale() bool {
	for _, d := range p.state.Load().devices {
		if d.Present && (nodesExist(d.hostNodes) && onVFIO(d.driverLinks)) != d.Healthy {
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
		deviceplugin.WithSocketPrefix(SocketPrefix),
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
		p.m.registered(e.Resource)
		entry.Info("registered with the kubelet")
		select {
		case p.registered <- struct{}{}:
		default:
		}
	case deviceplugin.EventRegisterFailed:
		entry.WithError(e.Err).Warn("registration failed; retrying")
	case deviceplugin.EventServeFailed:
		entry.WithError(e.Err).Warn("serving failed; retrying")
	case deviceplugin.EventWaitingForKubelet:
		entry.Info("waiting for the kubelet's socket")
	case deviceplugin.EventKubeletRestarted:
		entry.Info("the kubelet restarted; registering again")
	case deviceplugin.EventSocketRemoved:
		entry.Info("our socket was removed; registering again")
	default:
		entry.WithField("event", e.Type).Debug("device plugin event")
	}
}

// writeSpecs writes one spec per resource and the nvidia.com/pgpu spec,
// from the devices vfio holds whole, and removes specs left without devices.
func (p *plugin) writeSpecs(snap *snapshot) {
	opts := cdi.SpecOptions{NodeOptions: cdi.NodeOptions{Mode: snap.mode, Sysfs: p.sysfs}, ByGroup: true}
	want := map[string][]*vfio.Passthrough{}
	var all []*vfio.Passthrough
	for _, d := range snap.devices {
		if d.passthru != nil && d.passthru.Ready() {
			all = append(all, d.passthru)
			if d.Resource != cdi.PassthroughKind {
				want[d.Resource] = append(want[d.Resource], d.passthru)
			}
		}
	}
	for _, kind := range slices.Sorted(maps.Keys(want)) {
		spec, err := cdi.NewSpec(kind, want[kind], opts)
		p.write(kind, spec, err)
	}
	spec, err := cdi.NewPassthroughSpec(all, opts.NodeOptions)
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
	srv, err := probe.Listen(addr, probe.Handlers{Ready: p.notReady, Metrics: p.m.write})
	if err != nil {
		return nil, fmt.Errorf("--health-address %q: %w", addr, err)
	}
	p.log.WithField("address", srv.Addr().String()).Info("serving /healthz, /readyz and /metrics")
	return srv.Close, nil
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
	env      string         // PCI_RESOURCE_NVIDIA_COM_<NAME>
	count    *atomic.Uint64 // allocations of this resource
}

func newAllocator(p *plugin, resource string) *allocator {
	return &allocator{p: p, resource: resource, env: envName(resource),
		count: p.m.allocated(resource)}
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
		resp.CdiDevices = append(resp.CdiDevices, &pluginapi.CDIDevice{Name: cdi.QualifiedName(d.Resource, id)})
	}
	common := vfio.CommonDevicePath(snap.mode)
	resp.Devices = append(resp.Devices, &pluginapi.DeviceSpec{ContainerPath: common, HostPath: common, Permissions: "mrw"})
	resp.Envs[a.env] = strings.Join(ids, ",")
	a.count.Add(1)
	return resp, nil
}

type preferrer struct{ p *plugin }

func (pr preferrer) Preferred(available, mustInclude []string, size int) []string {
	return preferred(pr.p.state.Load().devices, available, mustInclude, size)
}
