package deviceplugin_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/deviceplugin"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/deviceplugin/deviceplugintest"
)

// waitRegistrations waits until the kubelet has seen n registrations.
func waitRegistrations(k *deviceplugintest.Kubelet, n int) *pluginapi.RegisterRequest {
	k.WaitFor("registration", func(map[string]*deviceplugintest.Plugin) bool { return len(k.Registrations()) >= n })
	return k.Registrations()[n-1]
}

type allocator struct{}

func (allocator) Allocate(_ context.Context, ids []string) (*pluginapi.ContainerAllocateResponse, error) {
	return &pluginapi.ContainerAllocateResponse{Envs: map[string]string{"IDS": strings.Join(ids, ",")}}, nil
}

type preferFirst struct{}

func (preferFirst) Preferred(available, must []string, size int) []string { return available[:size] }

// runServer runs s until the test ends and checks Run's result.
func runServer(t *testing.T, s *deviceplugin.Server) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

func dial(t *testing.T, path string) (pluginapi.DevicePluginClient, *grpc.ClientConn) {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return pluginapi.NewDevicePluginClient(conn), conn
}

// eventually polls cond for up to 5s: for state that settles after an
// asynchronous step the test cannot wait on directly.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 5s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestRegisterListAndWatchAllocate(t *testing.T) {
	dir := t.TempDir()
	k := deviceplugintest.Start(t, dir)
	s := deviceplugin.New("nvidia.com/GA102GL_A10", allocator{}, deviceplugin.WithDir(dir),
		deviceplugin.WithPreferrer(preferFirst{}))
	s.SetDevices([]deviceplugin.Device{
		{ID: "0000:65:00.0", Healthy: true, NUMANodes: []int{0}},
		{ID: "0000:17:00.0", Healthy: true},
	})
	runServer(t, s)
	r := waitRegistrations(k, 1)
	if r.ResourceName != "nvidia.com/GA102GL_A10" || r.Version != pluginapi.Version ||
		r.Endpoint != "nvidia.com_GA102GL_A10.sock" || !r.Options.GetPreferredAllocationAvailable {
		t.Fatalf("registration %+v", r)
	}
	if fi, err := os.Stat(s.SocketPath()); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket: %v %v; want mode 0600", fi, err)
	}

	c, _ := dial(t, s.SocketPath())
	stream, err := c.ListAndWatch(context.Background(), &pluginapi.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	first, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(first.Devices) != 2 || first.Devices[0].ID != "0000:17:00.0" || first.Devices[0].Topology != nil ||
		first.Devices[1].Topology.Nodes[0].ID != 0 {
		t.Fatalf("first list %v", first.Devices)
	}

	// A health change reaches the stream; setting the same list again sends nothing.
	s.SetDevices([]deviceplugin.Device{
		{ID: "0000:65:00.0", Healthy: false, NUMANodes: []int{0}},
		{ID: "0000:17:00.0", Healthy: true},
	})
	s.SetDevices([]deviceplugin.Device{
		{ID: "0000:17:00.0", Healthy: true},
		{ID: "0000:65:00.0", Healthy: false, NUMANodes: []int{0}},
	})
	second, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if second.Devices[1].Health != pluginapi.Unhealthy {
		t.Fatalf("second list %v", second.Devices)
	}

	// SetHealth changes the devices it names, and only those; the same
	// health again sends nothing.
	for _, step := range []struct {
		healthy bool
		ids     []string
		want    [2]string // health of 0000:17:00.0, 0000:65:00.0
	}{
		{true, []string{"0000:65:00.0", "0000:99:00.0"}, [2]string{pluginapi.Healthy, pluginapi.Healthy}},
		{false, []string{"0000:17:00.0"}, [2]string{pluginapi.Unhealthy, pluginapi.Healthy}},
		{true, []string{"0000:17:00.0"}, [2]string{pluginapi.Healthy, pluginapi.Healthy}},
	} {
		s.SetHealth(step.healthy, step.ids...)
		s.SetHealth(step.healthy, step.ids...)
		l, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if len(l.Devices) != 2 || l.Devices[0].ID != "0000:17:00.0" || l.Devices[0].Health != step.want[0] ||
			l.Devices[1].Health != step.want[1] || l.Devices[1].Topology.Nodes[0].ID != 0 {
			t.Fatalf("after SetHealth(%v, %v): %v; want 0000:17:00.0 %s, 0000:65:00.0 %s on NUMA node 0",
				step.healthy, step.ids, l.Devices, step.want[0], step.want[1])
		}
	}

	resp, err := c.Allocate(context.Background(), &pluginapi.AllocateRequest{ContainerRequests: []*pluginapi.ContainerAllocateRequest{
		{DevicesIds: []string{"0000:17:00.0"}}}})
	if err != nil || resp.ContainerResponses[0].Envs["IDS"] != "0000:17:00.0" {
		t.Fatalf("allocate: %v %v", resp, err)
	}
	s.SetHealth(false, "0000:65:00.0")
	for id, code := range map[string]codes.Code{"0000:65:00.0": codes.FailedPrecondition, "0000:99:00.0": codes.NotFound} {
		_, err := c.Allocate(context.Background(), &pluginapi.AllocateRequest{ContainerRequests: []*pluginapi.ContainerAllocateRequest{
			{DevicesIds: []string{id}}}})
		if status.Code(err) != code || !strings.Contains(err.Error(), id) {
			t.Errorf("allocate %s: %v; want %v naming it", id, err, code)
		}
	}
	pref, err := c.GetPreferredAllocation(context.Background(), &pluginapi.PreferredAllocationRequest{
		ContainerRequests: []*pluginapi.ContainerPreferredAllocationRequest{{AvailableDeviceIDs: []string{"a", "b"}, AllocationSize: 1}}})
	if err != nil || len(pref.ContainerResponses[0].DeviceIDs) != 1 {
		t.Errorf("preferred allocation: %v %v", pref, err)
	}
}

func TestWaitsForKubeletThenReregistersOnRestart(t *testing.T) {
	dir := t.TempDir()
	var mu sync.Mutex
	var events []deviceplugin.Event
	s := deviceplugin.New("nvidia.com/pgpu", allocator{}, deviceplugin.WithDir(dir),
		deviceplugin.WithEventHandler(func(e deviceplugin.Event) {
			mu.Lock()
			events = append(events, e)
			mu.Unlock()
		}))
	runServer(t, s)

	k := deviceplugintest.Start(t, dir) // the kubelet comes up after the plugin
	waitRegistrations(k, 1)
	eventually(t, "Registered()", s.Registered)
	mu.Lock()
	for _, e := range events {
		if e.Type == deviceplugin.EventRegisterFailed || e.Type == deviceplugin.EventServeFailed {
			t.Errorf("event %s: %v; want none while waiting for the kubelet", e.Type, e.Err)
		}
	}
	mu.Unlock()

	// A restarting kubelet may leave a dead kubelet.sock for a moment, so a
	// failed attempt is allowed here; a new registration is required.
	for range 3 {
		k = k.Restart()
		waitRegistrations(k, 1)
		eventually(t, "Registered() after a kubelet restart", s.Registered)
		if _, err := os.Stat(s.SocketPath()); err != nil {
			t.Fatalf("socket not re-created after kubelet restart: %v", err)
		}
	}
}

func TestStopRemovesSocketAndLeaksNothing(t *testing.T) {
	dir := t.TempDir()
	before := runtime.NumGoroutine()
	fdsBefore := openFDs(t)
	k := deviceplugintest.Start(t, dir)
	for i := range 20 {
		s := deviceplugin.New("example.com/thing", allocator{}, deviceplugin.WithDir(dir))
		stop := runServer(t, s)
		waitRegistrations(k, i+1)
		c, conn := dial(t, s.SocketPath())
		stream, err := c.ListAndWatch(context.Background(), &pluginapi.Empty{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := stream.Recv(); err != nil {
			t.Fatal(err)
		}
		stop()
		if _, err := os.Stat(s.SocketPath()); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("socket left after stop: %v", err)
		}
		if _, err := stream.Recv(); err == nil {
			t.Fatal("stream still open after stop")
		}
		conn.Close()
	}
	k.Stop()
	// Goroutines of closed connections end asynchronously: allow them a
	// moment, then the counts must be back where they started.
	eventually(t, "goroutines back to their number before the runs", func() bool {
		return runtime.NumGoroutine() <= before
	})
	if n := openFDs(t); n > fdsBefore {
		t.Errorf("open fds grew from %d to %d over 20 runs", fdsBefore, n)
	}
}

func openFDs(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd") // the package serves on Linux only
	if err != nil {
		t.Fatalf("count open fds: %v", err)
	}
	return len(entries)
}

func TestLongResourceNameGetsAShortSocket(t *testing.T) {
	base, err := os.MkdirTemp("", "dp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	dir := filepath.Join(base, strings.Repeat("d", 40)) // a short base: kubelet.sock must still fit
	if err := os.MkdirAll(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	k := deviceplugintest.Start(t, dir)
	long := "nvidia.com/" + strings.Repeat("GH100_H100_SXM5_", 3) + "80GB_HBM3_WITH_A_VERY_LONG_NAME"
	s := deviceplugin.New(long, allocator{}, deviceplugin.WithDir(dir))
	runServer(t, s)
	if r := waitRegistrations(k, 1); r.ResourceName != long || len(s.SocketPath()) > 107 {
		t.Errorf("registered %q on %q (%d chars)", r.ResourceName, s.SocketPath(), len(s.SocketPath()))
	}
	other := deviceplugin.New(long+"2", allocator{}, deviceplugin.WithDir(dir))
	if other.SocketPath() == s.SocketPath() {
		t.Error("two long resources share a socket name")
	}
}

// Event types go into metric labels and log fields as they are.
func TestEventTypesAreLabelValues(t *testing.T) {
	for _, e := range []deviceplugin.EventType{deviceplugin.EventServing, deviceplugin.EventRegistered,
		deviceplugin.EventRegisterFailed, deviceplugin.EventWaitingForKubelet, deviceplugin.EventKubeletRestarted,
		deviceplugin.EventSocketRemoved, deviceplugin.EventServeFailed, deviceplugin.EventStopped} {
		for _, r := range e {
			if (r < 'a' || r > 'z') && r != '_' {
				t.Errorf("event type %q: not snake_case", e)
				break
			}
		}
	}
}
