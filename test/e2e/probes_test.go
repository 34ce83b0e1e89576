package e2e

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/kubernetes/pkg/probe"
	httpprobe "k8s.io/kubernetes/pkg/probe/http"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/deviceplugin/deviceplugintest"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
)

// kubeletProbe runs one of a container's probes from the shipped manifests
// as the kubelet's prober does (its request, its client, its reading of
// the answer), against the agent at port.
func kubeletProbe(t *testing.T, c *corev1.Container, p *corev1.Probe, port int) (probe.Result, string) {
	t.Helper()
	if p == nil || p.HTTPGet == nil {
		t.Fatalf("%s: no httpGet probe in the manifest", c.Name)
	}
	get := p.HTTPGet.DeepCopy()
	// The manifest's named port is the container's; the test's agent
	// listens where the test put it.
	get.Port = intstr.FromInt32(int32(port))
	req, err := httpprobe.NewRequestForHTTPGetAction(get, c, "127.0.0.1", "probe")
	if err != nil {
		t.Fatal(err)
	}
	timeout := time.Duration(max(p.TimeoutSeconds, 1)) * time.Second // the API server's default is 1
	result, out, err := httpprobe.New(false).Probe(req, timeout)
	if err != nil {
		t.Fatalf("%s %s: the kubelet's prober: %v", c.Name, req.URL, err)
	}
	return result, out
}

// The device plugin as its DaemonSet runs it answers the kubelet's own
// prober: alive at once, ready only once registered, and its /metrics
// parses as Prometheus reads it.
func TestPluginProbesWithTheKubeletsProber(t *testing.T) {
	m := loadManifests(t)
	ds := m.daemonSets["sandbox-device-plugin"]
	if ds == nil {
		t.Fatal("no sandbox-device-plugin DaemonSet")
	}
	c := &ds.Spec.Template.Spec.Containers[0]
	if !strings.Contains(strings.Join(c.Args, " "), "--health-address") {
		t.Fatalf("the DaemonSet's args %v do not serve the probes", c.Args)
	}
	tree, _ := vfiotest.New(t, vfiotest.BoundToVFIO(vfiotest.A10WithAudio()))
	pluginDir := t.TempDir()
	port := freePort(t)
	_, out := startPlugin(t, pluginDir, tree, filepath.Join(t.TempDir(), "cdi"), "--health-address", fmt.Sprintf("127.0.0.1:%d", port))
	waitLog(t, out, "serving /healthz, /readyz and /metrics")
	// The first scan done, readiness says what it waits for.
	waitBody(t, fmt.Sprintf("http://127.0.0.1:%d%s", port, c.ReadinessProbe.HTTPGet.Path),
		"not registered with the kubelet: nvidia.com/GA102GL_A10")

	if r, body := kubeletProbe(t, c, c.LivenessProbe, port); r != probe.Success {
		t.Errorf("liveness: %s %q; want success", r, body)
	}
	if r, out := kubeletProbe(t, c, c.ReadinessProbe, port); r != probe.Failure || !strings.Contains(out, "503") {
		t.Errorf("readiness without a kubelet: %s %q; want a failure on 503", r, out)
	}

	deviceplugintest.Start(t, pluginDir)
	deadline := time.Now().Add(10 * time.Second)
	for {
		r, body := kubeletProbe(t, c, c.ReadinessProbe, port)
		if r == probe.Success {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("readiness with a kubelet: still %s %q", r, body)
		}
		time.Sleep(5 * time.Millisecond)
	}

	// Counted once the registration's event is handled, a moment after
	// the kubelet has it.
	waitBody(t, fmt.Sprintf("http://127.0.0.1:%d/metrics", port), `gpu_sandbox_registrations_total{resource="nvidia.com/GA102GL_A10"} 1`)
	metrics := httpGet(t, fmt.Sprintf("http://127.0.0.1:%d/metrics", port))
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(metrics))
	if err != nil {
		t.Fatalf("/metrics: %v\n%s", err, metrics)
	}
	if f := families["gpu_sandbox_registrations_total"]; f == nil || len(f.GetMetric()) != 1 || f.GetMetric()[0].GetCounter().GetValue() != 1 {
		t.Errorf("gpu_sandbox_registrations_total: %v; want one registration of the A10", f)
	}
}
