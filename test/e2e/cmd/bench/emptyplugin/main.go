// Command emptyplugin is the floor under a device plugin in the benchmarks:
// it serves the device-plugin API with nothing behind it (a fixed list of
// healthy devices, an empty Allocate answer) and registers once, with plain
// gRPC and the kubelet's API package, the least any plugin links and does.
//
// Given a file to watch, device 0 follows it, as kubevirt-gpu-device-plugin
// follows a /dev/vfio node: a goroutine reads fsnotify's events and hands
// each change to ListAndWatch, which sends the list. That is the floor under
// health propagation.
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"

	"github.com/fsnotify/fsnotify"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

type plugin struct {
	pluginapi.UnimplementedDevicePluginServer
	mu      sync.Mutex
	devices []*pluginapi.Device
	changed chan struct{} // closed and replaced on every change
}

// setHealth replaces the list with device 0 at health.
func (p *plugin) setHealth(health string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	devices := slices.Clone(p.devices)
	devices[0] = &pluginapi.Device{ID: devices[0].ID, Health: health}
	p.devices = devices
	close(p.changed)
	p.changed = make(chan struct{})
}

func (p *plugin) list() ([]*pluginapi.Device, chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.devices, p.changed
}

// follow sets device 0's health from the events on node.
func (p *plugin) follow(w *fsnotify.Watcher, node string) {
	for ev := range w.Events {
		switch {
		case ev.Name != node:
		case ev.Has(fsnotify.Remove) || ev.Has(fsnotify.Rename):
			p.setHealth(pluginapi.Unhealthy)
		case ev.Has(fsnotify.Create):
			p.setHealth(pluginapi.Healthy)
		}
	}
}

func (p *plugin) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{}, nil
}

func (p *plugin) ListAndWatch(_ *pluginapi.Empty, s grpc.ServerStreamingServer[pluginapi.ListAndWatchResponse]) error {
	for {
		devices, changed := p.list()
		if err := s.Send(&pluginapi.ListAndWatchResponse{Devices: devices}); err != nil {
			return err
		}
		select {
		case <-changed:
		case <-s.Context().Done():
			return nil
		}
	}
}

func (p *plugin) Allocate(_ context.Context, r *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	resp := &pluginapi.AllocateResponse{}
	for range r.ContainerRequests {
		resp.ContainerResponses = append(resp.ContainerResponses, &pluginapi.ContainerAllocateResponse{})
	}
	return resp, nil
}

func main() {
	if len(os.Args) != 4 && len(os.Args) != 5 {
		fmt.Fprintln(os.Stderr, "usage: emptyplugin PLUGIN-DIR RESOURCE DEVICES [NODE]")
		os.Exit(2)
	}
	dir, resource := os.Args[1], os.Args[2]
	n, err := strconv.Atoi(os.Args[3])
	if err == nil && n < 1 {
		err = fmt.Errorf("%d devices: want at least one", n)
	}
	node := ""
	if len(os.Args) == 5 {
		node = os.Args[4]
	}
	if err == nil {
		err = run(dir, resource, n, node)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "emptyplugin:", err)
		os.Exit(1)
	}
}

func run(dir, resource string, n int, node string) error {
	p := &plugin{changed: make(chan struct{})}
	for i := range n {
		p.devices = append(p.devices, &pluginapi.Device{ID: fmt.Sprint(i), Health: pluginapi.Healthy})
	}
	if node != "" {
		w, err := fsnotify.NewWatcher()
		if err != nil {
			return err
		}
		if err := w.Add(filepath.Dir(node)); err != nil {
			return err
		}
		go p.follow(w, node)
	}
	const endpoint = "emptyplugin.sock"
	lis, err := net.Listen("unix", filepath.Join(dir, endpoint))
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	pluginapi.RegisterDevicePluginServer(srv, p)
	go srv.Serve(lis)
	conn, err := grpc.NewClient("unix://"+filepath.Join(dir, "kubelet.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	_, err = pluginapi.NewRegistrationClient(conn).Register(context.Background(), &pluginapi.RegisterRequest{
		Version: pluginapi.Version, Endpoint: endpoint, ResourceName: resource})
	conn.Close()
	if err != nil {
		return err
	}
	select {}
}
