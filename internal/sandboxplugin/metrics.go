package sandboxplugin

import (
	"bytes"
	"fmt"
	"io"
	"maps"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// metrics are the agent's series in the Prometheus text format, written by
// hand: the client library, with its runtime and process collectors, cost
// the agent about 1 MiB of resident memory for a dozen series. Names and
// types are those the library gave them.
type metrics struct {
	mu            sync.Mutex
	devices       map[deviceKey]int
	shared        map[string]int // resource → devices whose group carries several
	allocations   map[string]*atomic.Uint64
	registrations map[string]uint64
}

type deviceKey struct{ resource, health string }

func newMetrics() *metrics {
	return &metrics{devices: map[deviceKey]int{}, allocations: map[string]*atomic.Uint64{}, registrations: map[string]uint64{}}
}

// update sets gpu_sandbox_devices from a snapshot, keeping a zero for each
// health of every resource so that dashboards see a count go to zero.
func (m *metrics) update(snap *snapshot) {
	devices := map[deviceKey]int{}
	shared := map[string]int{}
	for _, d := range snap.devices {
		shared[d.Resource] += 0
		if d.passthru != nil && d.passthru.Shared() {
			shared[d.Resource]++
		}
		devices[deviceKey{d.Resource, "healthy"}] += 0
		devices[deviceKey{d.Resource, "unhealthy"}] += 0
		health := "unhealthy"
		if d.Healthy {
			health = "healthy"
		}
		devices[deviceKey{d.Resource, health}]++
	}
	m.mu.Lock()
	m.devices, m.shared = devices, shared
	m.mu.Unlock()
}

// allocated returns the counter of Allocate calls answered for resource.
func (m *metrics) allocated(resource string) *atomic.Uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	c := m.allocations[resource]
	if c == nil {
		c = &atomic.Uint64{}
		m.allocations[resource] = c
	}
	return c
}

func (m *metrics) registered(resource string) {
	m.mu.Lock()
	m.registrations[resource]++
	m.mu.Unlock()
}

// write writes every series, families in a fixed order and series sorted.
func (m *metrics) write(w io.Writer) {
	m.mu.Lock()
	keys := slices.SortedFunc(maps.Keys(m.devices), func(a, b deviceKey) int {
		return strings.Compare(a.resource+"\x00"+a.health, b.resource+"\x00"+b.health)
	})
	family(w, "gpu_sandbox_devices", "gauge", "Devices advertised, by resource and health.")
	for _, k := range keys {
		fmt.Fprintf(w, "gpu_sandbox_devices{health=%s,resource=%s} %d\n", quote(k.health), quote(k.resource), m.devices[k])
	}
	family(w, "gpu_sandbox_shared_iommu_groups", "gauge", "Devices whose IOMMU group carries several selected devices (GPUs behind a switch without ACS), by resource: one allocation gives them all.")
	for _, r := range slices.Sorted(maps.Keys(m.shared)) {
		fmt.Fprintf(w, "gpu_sandbox_shared_iommu_groups{resource=%s} %d\n", quote(r), m.shared[r])
	}
	family(w, "gpu_sandbox_allocations_total", "counter", "Allocate calls answered, by resource.")
	for _, r := range slices.Sorted(maps.Keys(m.allocations)) {
		fmt.Fprintf(w, "gpu_sandbox_allocations_total{resource=%s} %d\n", quote(r), m.allocations[r].Load())
	}
	family(w, "gpu_sandbox_registrations_total", "counter", "Registrations with the kubelet, by resource.")
	for _, r := range slices.Sorted(maps.Keys(m.registrations)) {
		fmt.Fprintf(w, "gpu_sandbox_registrations_total{resource=%s} %d\n", quote(r), m.registrations[r])
	}
	m.mu.Unlock()
	writeRuntime(w)
}

func family(w io.Writer, name, typ, help string) {
	fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
}

// quote writes a label value with the escapes the text format wants.
func quote(v string) string {
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(v) + `"`
}

// writeRuntime writes the runtime and process series that show leaks
// across kubelet restarts (goroutines, threads, open files, memory), under
// the names the client library's Go and process collectors use.
func writeRuntime(w io.Writer) {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	gauge := func(name, help string, v float64) {
		family(w, name, "gauge", help)
		fmt.Fprintf(w, "%s %s\n", name, strconv.FormatFloat(v, 'g', -1, 64))
	}
	gauge("go_goroutines", "Number of goroutines that currently exist.", float64(runtime.NumGoroutine()))
	family(w, "go_info", "gauge", "Information about the Go environment.")
	fmt.Fprintf(w, "go_info{version=%s} 1\n", quote(runtime.Version()))
	gauge("go_memstats_alloc_bytes", "Number of bytes allocated in heap and currently in use.", float64(ms.HeapAlloc))
	gauge("go_memstats_heap_inuse_bytes", "Number of heap bytes that are in use.", float64(ms.HeapInuse))
	gauge("go_memstats_stack_inuse_bytes", "Number of bytes obtained from system for stack allocator in non-CGO environments.", float64(ms.StackInuse))
	gauge("go_memstats_sys_bytes", "Number of bytes obtained from system.", float64(ms.Sys))

	status, _ := os.ReadFile("/proc/self/status")
	if v, ok := statusField(status, "Threads:"); ok {
		gauge("go_threads", "Number of OS threads created.", v)
	}
	if v, ok := statusField(status, "VmRSS:"); ok {
		gauge("process_resident_memory_bytes", "Resident memory size in bytes.", v*1024)
	}
	if v, ok := statusField(status, "VmSize:"); ok {
		gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.", v*1024)
	}
	if fds, err := os.ReadDir("/proc/self/fd"); err == nil {
		gauge("process_open_fds", "Number of open file descriptors.", float64(len(fds)))
	}
	var lim unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &lim) == nil {
		gauge("process_max_fds", "Maximum number of open file descriptors.", float64(lim.Cur))
	}
	var ru unix.Rusage
	if unix.Getrusage(unix.RUSAGE_SELF, &ru) == nil {
		family(w, "process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.")
		cpu := float64(ru.Utime.Sec+ru.Stime.Sec) + float64(ru.Utime.Usec+ru.Stime.Usec)/1e6
		fmt.Fprintf(w, "process_cpu_seconds_total %s\n", strconv.FormatFloat(cpu, 'g', -1, 64))
	}
}

// statusField reads a number from /proc/self/status ("VmRSS:   1234 kB").
func statusField(status []byte, key string) (float64, bool) {
	_, rest, ok := bytes.Cut(status, []byte("\n"+key))
	if !ok {
		return 0, false
	}
	line, _, _ := bytes.Cut(rest, []byte("\n"))
	f := strings.Fields(string(line))
	if len(f) == 0 {
		return 0, false
	}
	v, err := strconv.ParseFloat(f[0], 64)
	return v, err == nil
}
