package sandboxplugin

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics are the agent's Prometheus series, on a registry of its own.
type metrics struct {
	reg           *prometheus.Registry
	devices       *prometheus.GaugeVec
	allocations   *prometheus.CounterVec
	registrations *prometheus.CounterVec
}

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		devices: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "gpu_sandbox_devices", Help: "Devices advertised, by resource and health.",
		}, []string{"resource", "health"}),
		allocations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "gpu_sandbox_allocations_total", Help: "Allocate calls answered, by resource.",
		}, []string{"resource"}),
		registrations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "gpu_sandbox_registrations_total", Help: "Registrations with the kubelet, by resource.",
		}, []string{"resource"}),
	}
	// The runtime's own series (goroutines, open fds, memory) show leaks
	// across kubelet restarts.
	m.reg.MustRegister(m.devices, m.allocations, m.registrations,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *metrics) update(snap *snapshot) {
	m.devices.Reset()
	for _, d := range snap.devices {
		health := "unhealthy"
		if d.Healthy {
			health = "healthy"
		}
		m.devices.WithLabelValues(d.Resource, health).Inc()
	}
	// Keep a zero for every resource so that dashboards see it go to zero.
	for _, d := range snap.devices {
		m.devices.WithLabelValues(d.Resource, "healthy").Add(0)
		m.devices.WithLabelValues(d.Resource, "unhealthy").Add(0)
	}
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}
