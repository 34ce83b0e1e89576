package deviceplugin

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

// DefaultDir is the kubelet's device-plugin directory.
const DefaultDir = pluginapi.DevicePluginPath

// Device is one device as the kubelet sees it.
type Device struct {
	ID      string
	Healthy bool
	// NUMANodes are the NUMA nodes the device is attached to; nil (the
	// zero value) for none: no topology hint.
	NUMANodes []int
}

// Allocator decides what a container gets for a set of devices. The Server
// has already checked that every ID is known and healthy.
type Allocator interface {
	Allocate(ctx context.Context, ids []string) (*pluginapi.ContainerAllocateResponse, error)
}

// Preferrer chooses size devices among available, keeping mustInclude.
type Preferrer interface {
	Preferred(available, mustInclude []string, size int) []string
}

// EventType says what happened in a Server's life. Its values are
// snake_case words, usable as they are as a metric label or a log field.
type EventType string

// Events reported to an event handler.
const (
	EventServing           EventType = "serving"             // a fresh socket is listening
	EventRegistered        EventType = "registered"          // the kubelet accepted the registration
	EventRegisterFailed    EventType = "register_failed"     // Err says why; retried
	EventWaitingForKubelet EventType = "waiting_for_kubelet" // kubelet.sock is absent
	EventKubeletRestarted  EventType = "kubelet_restarted"   // kubelet.sock was re-created
	EventSocketRemoved     EventType = "socket_removed"      // someone removed our socket
	EventServeFailed       EventType = "serve_failed"        // Err says why; restarted
	EventStopped           EventType = "stopped"
)

// Event is passed to the handler set with WithEventHandler.
type Event struct {
	Resource string
	Type     EventType
	Err      error
}

// Server serves one resource.
type Server struct {
	resource string
	dir      string
	socket   string
	prefix   string
	alloc    Allocator
	pref     Preferrer
	events   func(Event)
	retry    time.Duration

	mu      sync.Mutex
	devices []*pluginapi.Device
	index   map[string]*pluginapi.Device
	changed chan struct{} // closed and replaced on every change

	registered atomic.Bool
}

// Option configures a Server.
type Option func(*Server)

// WithDir sets the kubelet's plugin directory. Default: DefaultDir.
func WithDir(dir string) Option { return func(s *Server) { s.dir = dir } }

// WithSocketName sets the socket's file name in the directory.
// Default: the socket prefix (WithSocketPrefix) and the resource with "/"
// as "_", plus ".sock", shortened with a hash of the resource where the
// whole path would pass the kernel's limit for socket paths.
func WithSocketName(name string) Option { return func(s *Server) { s.socket = name } }

// WithSocketPrefix starts the default socket name, so that a plugin's
// sockets are told from others' in the shared directory. Default: none.
func WithSocketPrefix(prefix string) Option { return func(s *Server) { s.prefix = prefix } }

// maxSocketPath is the longest path a unix socket can bind to (sun_path
// holds 108 bytes with the terminating NUL).
const maxSocketPath = 107

func defaultSocketName(dir, prefix, resource string) string {
	name := prefix + strings.ReplaceAll(resource, "/", "_")
	if len(filepath.Join(dir, name+".sock")) <= maxSocketPath {
		return name + ".sock"
	}
	h := fnv.New32a()
	h.Write([]byte(resource))
	suffix := fmt.Sprintf("-%08x.sock", h.Sum32())
	keep := max(maxSocketPath-len(filepath.Join(dir, suffix)), len(prefix)+1)
	return name[:min(keep, len(name))] + suffix
}

// WithPreferrer offers GetPreferredAllocation. Default: not offered.
func WithPreferrer(p Preferrer) Option { return func(s *Server) { s.pref = p } }

// WithEventHandler receives the Server's life events, for logging and
// metrics; it must not block. Default: none.
func WithEventHandler(f func(Event)) Option { return func(s *Server) { s.events = f } }

// WithRetryInterval sets the first delay before a failed registration or
// start is retried; it doubles up to 30 times the first. Default: 500ms.
func WithRetryInterval(d time.Duration) Option { return func(s *Server) { s.retry = d } }

// New returns a Server for resource (e.g. "nvidia.com/GA102GL_A10").
func New(resource string, alloc Allocator, opts ...Option) *Server {
	s := &Server{
		resource: resource,
		dir:      DefaultDir,
		alloc:    alloc,
		events:   func(Event) {},
		retry:    500 * time.Millisecond,
		index:    map[string]*pluginapi.Device{},
		changed:  make(chan struct{}),
	}
	for _, o := range opts {
		o(s)
	}
	if s.socket == "" {
		s.socket = defaultSocketName(s.dir, s.prefix, resource)
	}
	return s
}

// Resource is the resource name the Server registers.
func (s *Server) Resource() string { return s.resource }

// SocketPath is where the Server listens.
func (s *Server) SocketPath() string { return filepath.Join(s.dir, s.socket) }

// Registered reports whether the kubelet accepted the current registration.
func (s *Server) Registered() bool { return s.registered.Load() }

// SetDevices replaces the device list. Streams get the new list at once
// when it differs from the old one.
func (s *Server) SetDevices(devices []Device) {
	list := make([]*pluginapi.Device, len(devices))
	for i, d := range devices {
		health := pluginapi.Unhealthy
		if d.Healthy {
			health = pluginapi.Healthy
		}
		pd := &pluginapi.Device{ID: d.ID, Health: health}
		if len(d.NUMANodes) > 0 {
			pd.Topology = &pluginapi.TopologyInfo{}
			for _, n := range d.NUMANodes {
				pd.Topology.Nodes = append(pd.Topology.Nodes, &pluginapi.NUMANode{ID: int64(n)})
			}
		}
		list[i] = pd
	}
	slices.SortFunc(list, func(a, b *pluginapi.Device) int { return strings.Compare(a.ID, b.ID) })
	s.mu.Lock()
	defer s.mu.Unlock()
	if slices.EqualFunc(list, s.devices, sameDevice) {
		return
	}
	s.devices = list
	s.index = make(map[string]*pluginapi.Device, len(list))
	for _, d := range list {
		s.index[d.ID] = d
	}
	close(s.changed)
	s.changed = make(chan struct{})
}

// SetHealth sets the health of the devices with the given IDs and leaves
// the rest of the list as it is; streams get the new list at once when it
// differs. It is what a health event needs on its way to the kubelet: the
// devices it names changed, without the whole list built, sorted and
// compared again as SetDevices does. IDs not in the list are ignored.
func (s *Server) SetHealth(healthy bool, ids ...string) {
	health := pluginapi.Unhealthy
	if healthy {
		health = pluginapi.Healthy
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var list []*pluginapi.Device // a copy: streams may be sending the old one
	for _, id := range ids {
		d := s.index[id]
		if d == nil || d.Health == health {
			continue
		}
		if list == nil {
			list = slices.Clone(s.devices)
		}
		i, _ := slices.BinarySearchFunc(list, id, func(d *pluginapi.Device, id string) int { return strings.Compare(d.ID, id) })
		list[i] = &pluginapi.Device{ID: id, Health: health, Topology: d.Topology}
		s.index[id] = list[i]
	}
	if list == nil {
		return
	}
	s.devices = list
	close(s.changed)
	s.changed = make(chan struct{})
}

func sameDevice(a, b *pluginapi.Device) bool {
	if a.ID != b.ID || a.Health != b.Health || (a.Topology == nil) != (b.Topology == nil) {
		return false
	}
	return a.Topology == nil || slices.EqualFunc(a.Topology.Nodes, b.Topology.Nodes, func(x, y *pluginapi.NUMANode) bool { return x.ID == y.ID })
}

// snapshot returns the current list and the channel that closes when it changes.
func (s *Server) snapshot() ([]*pluginapi.Device, chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.devices, s.changed
}

// Run serves and registers until ctx ends. A missing kubelet.sock is waited
// for; failures are retried with backoff.
func (s *Server) Run(ctx context.Context) error {
	if err := os.MkdirAll(s.dir, 0o750); err != nil {
		return fmt.Errorf("device plugin %s: %w", s.resource, err)
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("device plugin %s: watch %q: %w", s.resource, s.dir, err)
	}
	defer w.Close()
	if err := w.Add(s.dir); err != nil {
		return fmt.Errorf("device plugin %s: watch %q: %w", s.resource, s.dir, err)
	}

	var inst *instance
	defer func() {
		if inst != nil {
			inst.stop()
		}
		s.registered.Store(false)
		s.events(Event{Resource: s.resource, Type: EventStopped})
	}()
	kubelet := filepath.Join(s.dir, filepath.Base(pluginapi.KubeletSocket))
	var registeredTo uint64 // inode of the kubelet.sock registered with
	delay := s.retry
	retry := time.NewTimer(0)
	defer retry.Stop()
	again := func(err error, t EventType) {
		s.events(Event{Resource: s.resource, Type: t, Err: err})
		retry.Reset(delay)
		delay = min(2*delay, 30*s.retry)
	}
	// restart replaces the gRPC server and its socket with fresh ones.
	restart := func() {
		s.registered.Store(false)
		if inst != nil {
			inst.stop()
			inst = nil
		}
		retry.Reset(0)
	}

	for {
		var served <-chan error
		if inst != nil {
			served = inst.done
		}
		select {
		case <-ctx.Done():
			return nil
		case <-retry.C:
			if inst == nil {
				if inst, err = s.serve(); err != nil {
					again(err, EventServeFailed)
					continue
				}
				s.events(Event{Resource: s.resource, Type: EventServing})
			}
			if s.Registered() {
				continue
			}
			id, err := fileID(kubelet)
			if err != nil {
				// Wait for the kubelet to create its socket; no retry loop.
				s.events(Event{Resource: s.resource, Type: EventWaitingForKubelet})
				continue
			}
			if err := s.register(ctx, kubelet); err != nil {
				again(err, EventRegisterFailed)
				continue
			}
			delay = s.retry
			registeredTo = id
			s.registered.Store(true)
			s.events(Event{Resource: s.resource, Type: EventRegistered})
		case err := <-served:
			inst = nil
			s.registered.Store(false)
			again(err, EventServeFailed)
		case ev, ok := <-w.Events:
			if !ok {
				return fmt.Errorf("device plugin %s: watcher closed", s.resource)
			}
			switch {
			case ev.Name == kubelet && ev.Has(fsnotify.Create):
				// The event may arrive after the plugin already registered
				// with this very kubelet (its socket was removed first):
				// register again only with a kubelet not yet registered with.
				if id, err := fileID(kubelet); err == nil && s.Registered() && id == registeredTo {
					continue
				}
				s.events(Event{Resource: s.resource, Type: EventKubeletRestarted})
				if exists(s.SocketPath()) && inst != nil {
					s.registered.Store(false)
					retry.Reset(0)
				} else {
					restart()
				}
			case ev.Name == s.SocketPath() && ev.Has(fsnotify.Remove) && inst != nil && !exists(s.SocketPath()):
				s.events(Event{Resource: s.resource, Type: EventSocketRemoved})
				restart()
			}
		case err := <-w.Errors:
			// An overflowed watch may have hidden a kubelet restart: start afresh.
			s.events(Event{Resource: s.resource, Type: EventServeFailed, Err: err})
			restart()
		}
	}
}

// fileID identifies a file by inode: a kubelet that restarts creates a new
// socket, a new inode.
func fileID(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// instance is one listener and gRPC server.
type instance struct {
	srv  *grpc.Server
	done chan error
}

func (s *Server) serve() (*instance, error) {
	path := s.SocketPath()
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale socket %q: %w", path, err)
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %q: %w", path, err)
	}
	// Only the kubelet (root) talks to the plugin.
	if err := os.Chmod(path, 0o600); err != nil {
		lis.Close()
		return nil, fmt.Errorf("listen on %q: %w", path, err)
	}
	inst := &instance{srv: grpc.NewServer(), done: make(chan error, 1)}
	pluginapi.RegisterDevicePluginServer(inst.srv, &service{s: s})
	go func() {
		err := inst.srv.Serve(lis)
		if err == nil {
			err = errors.New("server stopped")
		}
		inst.done <- fmt.Errorf("serve on %q: %w", path, err)
	}()
	return inst, nil
}

func (inst *instance) stop() {
	inst.srv.Stop() // closes the listener, which removes the socket
	<-inst.done
}

func (s *Server) register(ctx context.Context, kubelet string) error {
	// kubelet.sock appears at bind(), a moment before listen(): wait for the
	// kubelet to answer, retrying the connection quickly, rather than fail.
	conn, err := grpc.NewClient("unix://"+kubelet,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{
			BaseDelay: 5 * time.Millisecond, Multiplier: 2, MaxDelay: time.Second}}),
		grpc.WithDefaultCallOptions(grpc.WaitForReady(true)))
	if err != nil {
		return fmt.Errorf("register %s with %q: %w", s.resource, kubelet, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err = pluginapi.NewRegistrationClient(conn).Register(ctx, &pluginapi.RegisterRequest{
		Version:      pluginapi.Version,
		Endpoint:     s.socket,
		ResourceName: s.resource,
		Options:      s.options(),
	})
	if err != nil {
		return fmt.Errorf("register %s with %q: %w", s.resource, kubelet, err)
	}
	return nil
}

func (s *Server) options() *pluginapi.DevicePluginOptions {
	return &pluginapi.DevicePluginOptions{GetPreferredAllocationAvailable: s.pref != nil}
}

// service implements the kubelet's DevicePlugin service for a Server.
type service struct {
	pluginapi.UnimplementedDevicePluginServer
	s *Server
}

func (v *service) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return v.s.options(), nil
}

func (v *service) ListAndWatch(_ *pluginapi.Empty, stream grpc.ServerStreamingServer[pluginapi.ListAndWatchResponse]) error {
	for {
		devices, changed := v.s.snapshot()
		if err := stream.Send(&pluginapi.ListAndWatchResponse{Devices: devices}); err != nil {
			return err
		}
		select {
		case <-changed:
		case <-stream.Context().Done():
			return nil
		}
	}
}

func (v *service) GetPreferredAllocation(_ context.Context, req *pluginapi.PreferredAllocationRequest) (*pluginapi.PreferredAllocationResponse, error) {
	if v.s.pref == nil {
		return nil, status.Error(codes.Unimplemented, "preferred allocation is not offered")
	}
	resp := &pluginapi.PreferredAllocationResponse{}
	for _, r := range req.ContainerRequests {
		ids := v.s.pref.Preferred(r.AvailableDeviceIDs, r.MustIncludeDeviceIDs, int(r.AllocationSize))
		resp.ContainerResponses = append(resp.ContainerResponses, &pluginapi.ContainerPreferredAllocationResponse{DeviceIDs: ids})
	}
	return resp, nil
}

func (v *service) Allocate(ctx context.Context, req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	resp := &pluginapi.AllocateResponse{ContainerResponses: make([]*pluginapi.ContainerAllocateResponse, 0, len(req.ContainerRequests))}
	for _, r := range req.ContainerRequests {
		if err := v.s.check(r.DevicesIds); err != nil {
			return nil, err
		}
		cr, err := v.s.alloc.Allocate(ctx, r.DevicesIds)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "allocate %s %v: %v", v.s.resource, r.DevicesIds, err)
		}
		resp.ContainerResponses = append(resp.ContainerResponses, cr)
	}
	return resp, nil
}

// check refuses an allocation of devices that are unknown or unhealthy.
func (s *Server) check(ids []string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, id := range ids {
		d, ok := s.index[id]
		switch {
		case !ok:
			return status.Errorf(codes.NotFound, "allocate %s: unknown device %q", s.resource, id)
		case d.Health != pluginapi.Healthy:
			return status.Errorf(codes.FailedPrecondition, "allocate %s: device %q is unhealthy", s.resource, id)
		}
	}
	return nil
}

func (v *service) PreStartContainer(context.Context, *pluginapi.PreStartContainerRequest) (*pluginapi.PreStartContainerResponse, error) {
	return &pluginapi.PreStartContainerResponse{}, nil
}
