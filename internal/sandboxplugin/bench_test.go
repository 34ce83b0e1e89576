package sandboxplugin_test

import (
	"context"
	"os"

	"slices"
	"testing"
	"time"

	"github.com/fsnotify/fsnotify"

	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/deviceplugin/deviceplugintest"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
)

// latencies reports the median and 99th percentile of a benchmark's calls.
func latencies(b *testing.B, d []time.Duration) {
	slices.Sort(d)
	if len(d) == 0 {
		return
	}
	b.ReportMetric(float64(d[len(d)/2].Nanoseconds()), "p50-ns")
	b.ReportMetric(float64(d[len(d)*99/100].Nanoseconds()), "p99-ns")
}

func benchNode(b *testing.B) *node {
	n := newNode(b, vfiotest.BoundToVFIO(vfiotest.HGXH100()), true)
	n.run(b)
	return n
}

// BenchmarkAllocate measures Allocate of one GPU over the plugin's real unix
// socket, and beside it the floor: GetDevicePluginOptions, an empty unary
// call on the same socket and server.
func BenchmarkAllocate(b *testing.B) {
	n := benchNode(b)
	p := n.kubelet.WaitForDevices(h100, func(l []*pluginapi.Device) bool { return count(l, pluginapi.Healthy) == 8 })
	req := &pluginapi.AllocateRequest{ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: []string{"0000:18:00.0"}}}}
	ctx := context.Background()
	b.Run("allocate", func(b *testing.B) {
		var d []time.Duration
		for b.Loop() {
			start := time.Now()
			if _, err := p.Client.Allocate(ctx, req); err != nil {
				b.Fatal(err)
			}
			d = append(d, time.Since(start))
		}
		latencies(b, d)
	})
	b.Run("empty-unary-floor", func(b *testing.B) {
		var d []time.Duration
		for b.Loop() {
			start := time.Now()
			if _, err := p.Client.GetDevicePluginOptions(ctx, &pluginapi.Empty{}); err != nil {
				b.Fatal(err)
			}
			d = append(d, time.Since(start))
		}
		latencies(b, d)
	})
}

// BenchmarkHealthPropagation measures the time from a group node
// disappearing to the Unhealthy list reaching the kubelet's stream, timed
// from before the rename: a timer started after it would leave out the
// inotify event itself. The kubelet stand-in runs in this process; make
// bench measures the same across processes with the kubelet's own client.
func BenchmarkHealthPropagation(b *testing.B) {
	n := benchNode(b)
	n.kubelet.WaitForDevices(h100, func(l []*pluginapi.Device) bool { return count(l, pluginapi.Healthy) == 8 })
	node := n.tree.GroupNode(22)
	var d []time.Duration
	for b.Loop() {
		start := time.Now()
		if err := os.Rename(node, node+".gone"); err != nil {
			b.Fatal(err)
		}
		n.kubelet.WaitForDevices(h100, func(l []*pluginapi.Device) bool {
			return deviceplugintest.Health(l, "0000:3a:00.0") == pluginapi.Unhealthy
		})
		d = append(d, time.Since(start))
		b.StopTimer()
		if err := os.Rename(node+".gone", node); err != nil {
			b.Fatal(err)
		}
		n.kubelet.WaitForDevices(h100, func(l []*pluginapi.Device) bool {
			return deviceplugintest.Health(l, "0000:3a:00.0") == pluginapi.Healthy
		})
		b.StartTimer()
	}
	latencies(b, d)
}

// BenchmarkFsnotifyFloor is the floor under health propagation: the time
// from a file disappearing to fsnotify reporting it, with nothing else.
func BenchmarkFsnotifyFloor(b *testing.B) {
	dir := b.TempDir()
	node := dir + "/22"
	if err := os.WriteFile(node, nil, 0o600); err != nil {
		b.Fatal(err)
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		b.Fatal(err)
	}
	defer w.Close()
	if err := w.Add(dir); err != nil {
		b.Fatal(err)
	}
	var d []time.Duration
	for b.Loop() {
		start := time.Now()
		if err := os.Rename(node, node+".gone"); err != nil {
			b.Fatal(err)
		}
		for ev := range w.Events {
			if ev.Name == node {
				break
			}
		}
		d = append(d, time.Since(start))
		b.StopTimer()
		os.Rename(node+".gone", node)
		for ev := range w.Events {
			if ev.Name == node {
				break
			}
		}
		b.StartTimer()
	}
	latencies(b, d)
}
