// Package deviceplugintest is a stand-in for the kubelet's side of the
// device-plugin API, for tests of device plugins: it serves the
// registration service on kubelet.sock, and for each registered plugin
// dials its socket and follows its ListAndWatch stream as the kubelet does.
package deviceplugintest

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

// Timeout bounds every wait of this package.
const Timeout = 5 * time.Second

// T is the part of testing.TB the stand-in uses, so that programs other
// than tests (a demo) can run it too.
type T interface {
	Helper()
	Fatal(args ...any)
	Fatalf(format string, args ...any)
	Cleanup(func())
}

var _ T = testing.TB(nil)

// Kubelet serves kubelet.sock in a plugin directory.
type Kubelet struct {
	pluginapi.UnimplementedRegistrationServer
	Dir string

	srv *grpc.Server
	tb  T

	mu      sync.Mutex
	plugins map[string]*Plugin
	regs    []*pluginapi.RegisterRequest
	changed chan struct{} // closed and replaced on every registration or list
}

// Start serves kubelet.sock in dir until the test ends.
func Start(tb T, dir string) *Kubelet {
	tb.Helper()
	lis, err := net.Listen("unix", filepath.Join(dir, "kubelet.sock"))
	if err != nil {
		tb.Fatal(err)
	}
	k := &Kubelet{Dir: dir, srv: grpc.NewServer(), tb: tb, plugins: map[string]*Plugin{}, changed: make(chan struct{})}
	pluginapi.RegisterRegistrationServer(k.srv, k)
	go func() { _ = k.srv.Serve(lis) }()
	tb.Cleanup(k.Stop)
	return k
}

// Stop stops serving and drops every plugin connection.
func (k *Kubelet) Stop() {
	k.srv.Stop()
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, p := range k.plugins {
		p.close()
	}
	k.plugins = map[string]*Plugin{}
}

// Restart does what a restarting kubelet does: stop, remove every socket in
// the directory, and serve kubelet.sock afresh. Plugins must register again.
func (k *Kubelet) Restart() *Kubelet {
	k.tb.Helper()
	k.Stop()
	entries, _ := os.ReadDir(k.Dir)
	for _, e := range entries {
		if e.Type()&os.ModeSocket != 0 {
			_ = os.Remove(filepath.Join(k.Dir, e.Name()))
		}
	}
	return Start(k.tb, k.Dir)
}

// Register is the kubelet's registration service: it records the request and
// connects to the plugin.
func (k *Kubelet) Register(_ context.Context, r *pluginapi.RegisterRequest) (*pluginapi.Empty, error) {
	p, err := k.connect(r)
	if err != nil {
		return nil, err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if old := k.plugins[r.ResourceName]; old != nil {
		old.close()
	}
	k.plugins[r.ResourceName] = p
	k.regs = append(k.regs, r)
	k.notify()
	return &pluginapi.Empty{}, nil
}

func (k *Kubelet) notify() {
	close(k.changed)
	k.changed = make(chan struct{})
}

// Registrations returns every registration received so far.
func (k *Kubelet) Registrations() []*pluginapi.RegisterRequest {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]*pluginapi.RegisterRequest(nil), k.regs...)
}

// Plugin is a registered plugin as the kubelet follows it.
type Plugin struct {
	Resource string
	Client   pluginapi.DevicePluginClient
	Options  *pluginapi.DevicePluginOptions

	conn   *grpc.ClientConn
	cancel context.CancelFunc
	mu     sync.Mutex
	list   []*pluginapi.Device
}

func (k *Kubelet) connect(r *pluginapi.RegisterRequest) (*Plugin, error) {
	conn, err := grpc.NewClient("unix://"+filepath.Join(k.Dir, r.Endpoint),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &Plugin{Resource: r.ResourceName, Client: pluginapi.NewDevicePluginClient(conn), Options: r.Options,
		conn: conn, cancel: cancel}
	stream, err := p.Client.ListAndWatch(ctx, &pluginapi.Empty{})
	if err != nil {
		p.close()
		return nil, err
	}
	go func() {
		for {
			resp, err := stream.Recv()
			if err != nil {
				return
			}
			p.mu.Lock()
			p.list = append([]*pluginapi.Device{}, resp.Devices...) // empty, not nil, once a list came
			p.mu.Unlock()
			k.mu.Lock()
			k.notify()
			k.mu.Unlock()
		}
	}()
	return p, nil
}

func (p *Plugin) close() {
	p.cancel()
	_ = p.conn.Close()
}

// Devices returns the last list the plugin sent.
func (p *Plugin) Devices() []*pluginapi.Device {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.list
}

// WaitFor waits until cond holds for the registered plugins (resource →
// plugin) and returns them; the test fails after Timeout.
func (k *Kubelet) WaitFor(what string, cond func(map[string]*Plugin) bool) map[string]*Plugin {
	k.tb.Helper()
	deadline := time.After(Timeout)
	for {
		k.mu.Lock()
		plugins := make(map[string]*Plugin, len(k.plugins))
		for r, p := range k.plugins {
			plugins[r] = p
		}
		changed := k.changed
		k.mu.Unlock()
		if cond(plugins) {
			return plugins
		}
		select {
		case <-changed:
		case <-deadline:
			var lists []string
			for r, p := range plugins {
				for _, d := range p.Devices() {
					lists = append(lists, r+" "+d.ID+" "+d.Health)
				}
			}
			k.tb.Fatalf("kubelet: %s: not within %s; plugins list:\n%s", what, Timeout, strings.Join(lists, "\n"))
			return nil
		}
	}
}

// WaitForDevices waits until the resource's plugin lists devices that cond
// accepts, and returns the plugin.
func (k *Kubelet) WaitForDevices(resource string, cond func([]*pluginapi.Device) bool) *Plugin {
	k.tb.Helper()
	plugins := k.WaitFor("devices of "+resource, func(ps map[string]*Plugin) bool {
		p := ps[resource]
		return p != nil && p.Devices() != nil && cond(p.Devices())
	})
	return plugins[resource]
}

// Health returns a device's health in a list, "" when it is not listed.
func Health(list []*pluginapi.Device, id string) string {
	for _, d := range list {
		if d.ID == id {
			return d.Health
		}
	}
	return ""
}
