package sandboxplugin

import (
	"bytes"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// The hand-written exposition parses with Prometheus's own parser, under
// the names and types the client library gave the series.
func TestMetricsExposition(t *testing.T) {
	m := newMetrics()
	m.update(&snapshot{devices: map[string]*device{
		"0000:18:00.0": {Resource: "nvidia.com/GH100", Healthy: true},
		"0000:2a:00.0": {Resource: "nvidia.com/GH100"},
		"0000:05:00.0": {Resource: "nvidia.com/nvswitch", Healthy: true},
	}})
	m.allocated("nvidia.com/GH100").Add(2)
	m.registered("nvidia.com/GH100")
	m.registered("nvidia.com/GH100")
	var buf bytes.Buffer
	m.write(&buf)
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(&buf)
	if err != nil {
		t.Fatalf("parse: %v\n%s", err, buf.String())
	}
	want := map[string]dto.MetricType{
		"gpu_sandbox_devices": dto.MetricType_GAUGE, "gpu_sandbox_allocations_total": dto.MetricType_COUNTER,
		"gpu_sandbox_registrations_total": dto.MetricType_COUNTER, "go_goroutines": dto.MetricType_GAUGE,
		"go_threads": dto.MetricType_GAUGE, "go_info": dto.MetricType_GAUGE, "go_memstats_alloc_bytes": dto.MetricType_GAUGE,
		"process_open_fds": dto.MetricType_GAUGE, "process_max_fds": dto.MetricType_GAUGE,
		"process_resident_memory_bytes": dto.MetricType_GAUGE, "process_cpu_seconds_total": dto.MetricType_COUNTER,
	}
	for name, typ := range want {
		f := families[name]
		if f == nil {
			t.Errorf("no %s", name)
			continue
		}
		if f.GetType() != typ {
			t.Errorf("%s: type %v, want %v", name, f.GetType(), typ)
		}
	}
	value := func(name string, labels map[string]string) float64 {
		t.Helper()
		for _, s := range families[name].GetMetric() {
			match := len(s.GetLabel()) == len(labels)
			for _, l := range s.GetLabel() {
				match = match && labels[l.GetName()] == l.GetValue()
			}
			if match {
				return s.GetGauge().GetValue() + s.GetCounter().GetValue()
			}
		}
		t.Errorf("no %s%v", name, labels)
		return -1
	}
	for _, c := range []struct {
		resource, health string
		want             float64
	}{{"nvidia.com/GH100", "healthy", 1}, {"nvidia.com/GH100", "unhealthy", 1},
		{"nvidia.com/nvswitch", "healthy", 1}, {"nvidia.com/nvswitch", "unhealthy", 0}} {
		if got := value("gpu_sandbox_devices", map[string]string{"resource": c.resource, "health": c.health}); got != c.want {
			t.Errorf("gpu_sandbox_devices %s %s = %v, want %v", c.resource, c.health, got, c.want)
		}
	}
	if got := value("gpu_sandbox_allocations_total", map[string]string{"resource": "nvidia.com/GH100"}); got != 2 {
		t.Errorf("allocations %v, want 2", got)
	}
	if got := value("gpu_sandbox_registrations_total", map[string]string{"resource": "nvidia.com/GH100"}); got != 2 {
		t.Errorf("registrations %v, want 2", got)
	}
	if got := value("go_goroutines", nil); got < 1 {
		t.Errorf("go_goroutines %v", got)
	}
	if got := value("process_open_fds", nil); got < 3 {
		t.Errorf("process_open_fds %v", got)
	}
}
