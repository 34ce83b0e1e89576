package sandboxplugin_test

import (
	"context"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/deviceplugin/deviceplugintest"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
)

// 1,000 Allocate calls in parallel while one device's health flaps and
// another is hot-removed: every answer is either exactly the devices asked
// for or an error naming the one that cannot be had, and every list the
// kubelet sees is whole.
func TestAllocateUnderFlappingAndHotRemoval(t *testing.T) {
	n := newNode(t, vfiotest.BoundToVFIO(vfiotest.HGXH100()), true)
	n.run(t)
	gpus := n.kubelet.WaitForDevices(h100, func(l []*pluginapi.Device) bool { return count(l, pluginapi.Healthy) == 8 })

	stop := make(chan struct{})
	var flaps sync.WaitGroup
	flaps.Add(1)
	go func() { // the group node of 0000:3a:00.0 comes and goes
		defer flaps.Done()
		node := n.tree.GroupNode(22)
		for {
			select {
			case <-stop:
				os.Rename(node+".gone", node)
				return
			default:
			}
			os.Rename(node, node+".gone")
			time.Sleep(time.Millisecond)
			os.Rename(node+".gone", node)
			time.Sleep(time.Millisecond)
		}
	}()

	var ok, refused atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan string, 1000)
	for w := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 50 {
				if w == 0 && i == 25 {
					n.emu.RemoveDevice("0000:db:00.0") // hot-removed mid-way
				}
				id := vfiotest.HGXH100GPUs[(w+i)%8]
				resp, err := gpus.Client.Allocate(context.Background(), &pluginapi.AllocateRequest{
					ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: []string{id}}}})
				if err != nil {
					if !strings.Contains(err.Error(), id) {
						errs <- "error does not name " + id + ": " + err.Error()
					}
					refused.Add(1)
					continue
				}
				c := resp.ContainerResponses[0]
				if len(c.CdiDevices) != 1 || c.CdiDevices[0].Name != h100+"="+id || len(c.Devices) != 2 {
					errs <- "answer for " + id + " is not for it"
				}
				ok.Add(1)
			}
		}()
	}
	wg.Wait()
	close(stop)
	flaps.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	if ok.Load()+refused.Load() != 1000 || ok.Load() == 0 || refused.Load() == 0 {
		t.Errorf("%d answered, %d refused; want 1000 in all, some of each", ok.Load(), refused.Load())
	}
	// Afterwards: the flapping device healthy again, the removed one not,
	// and every list has each device once.
	list := n.kubelet.WaitForDevices(h100, func(l []*pluginapi.Device) bool {
		return deviceplugintest.Health(l, "0000:3a:00.0") == pluginapi.Healthy &&
			deviceplugintest.Health(l, "0000:db:00.0") == pluginapi.Unhealthy
	}).Devices()
	seen := map[string]bool{}
	for _, d := range list {
		if seen[d.ID] {
			t.Errorf("device %s listed twice", d.ID)
		}
		seen[d.ID] = true
	}
	if len(list) != 8 {
		t.Errorf("%d devices listed, want 8", len(list))
	}
}

// 100 kubelet restarts: the plugin registers again every time, and its
// goroutines and open files come back to where they were.
func TestKubeletRestartStorm(t *testing.T) {
	n := newNode(t, vfiotest.BoundToVFIO(vfiotest.HGXH100()), true)
	stopPlugin := n.run(t)
	both := func(k *deviceplugintest.Kubelet) {
		k.WaitFor("both resources", func(p map[string]*deviceplugintest.Plugin) bool {
			return p[h100] != nil && p[nvswitch] != nil && len(p[h100].Devices()) == 8
		})
	}
	both(n.kubelet)
	settle := func() (int, int) {
		time.Sleep(100 * time.Millisecond) // connections of the last restart close asynchronously
		runtime.GC()
		fds, _ := os.ReadDir("/proc/self/fd")
		return runtime.NumGoroutine(), len(fds)
	}
	g0, f0 := settle()
	k := n.kubelet
	for range 100 {
		k = k.Restart()
		both(k)
	}
	g1, f1 := settle()
	// The kubelet stand-in's own connections are part of the count: a
	// small, fixed slack, not one per restart.
	if g1 > g0+10 || f1 > f0+5 {
		t.Errorf("after 100 restarts: goroutines %d → %d, fds %d → %d", g0, g1, f0, f1)
	}
	stopPlugin()
}
