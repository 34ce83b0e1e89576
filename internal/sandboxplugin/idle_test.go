package sandboxplugin

import (
	"context"
	"io"
	"path/filepath"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
)

// idlePlugin is the plugin on the HGX preset after its first scan, with no
// kubelet: what an idle plugin does between events.
func idlePlugin(b *testing.B) (*plugin, context.Context) {
	tree, _ := vfiotest.New(b, vfiotest.BoundToVFIO(vfiotest.HGXH100()))
	log := logrus.New()
	log.SetOutput(io.Discard)
	p, err := newPlugin(Config{PluginDir: b.TempDir(), SysfsRoot: tree.SysfsRoot, DevRoot: tree.DevRoot,
		CDIRoot: filepath.Join(b.TempDir(), "cdi"), VFIOMode: "auto", Select: "10de", NVSwitchAlias: DefaultNVSwitchAlias,
		PollInterval: DefaultPollInterval, RescanInterval: DefaultRescanInterval, Log: log})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	b.Cleanup(func() { cancel(); p.wg.Wait() })
	p.bookkeep = time.NewTimer(time.Hour)
	p.scan(ctx)
	return p, ctx
}

// The poll runs four times a second on every node: what it allocates is
// what the idle plugin's heap grows by between collections.
func BenchmarkIdlePoll(b *testing.B) {
	p, _ := idlePlugin(b)
	b.ReportAllocs()
	for b.Loop() {
		if p.stale() {
			b.Fatal("stale on an unchanged node")
		}
	}
}

// The rescan runs every 30 seconds.
func BenchmarkIdleRescan(b *testing.B) {
	p, ctx := idlePlugin(b)
	b.ReportAllocs()
	for b.Loop() {
		p.scan(ctx)
	}
}
