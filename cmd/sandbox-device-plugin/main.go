// Command sandbox-device-plugin advertises the GPUs that vfio holds to the
// kubelet, for Kata Containers VMs to pass through.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"syscall"

	"github.com/spf13/pflag"

	"github.com/gpu-sandbox/gpu-sandbox/internal/cli"
	"github.com/gpu-sandbox/gpu-sandbox/internal/sandboxplugin"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/cdi"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/deviceplugin"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
)

func main() {
	// One processor unless GOMAXPROCS says otherwise: the plugin's work is
	// one event at a time, and with a second P a hand-off between its
	// goroutines (the /dev event, the stream that tells the kubelet) may
	// wake a thread on another CPU. Measured on two cores (BENCHMARKS.md):
	// health propagation within 3 to 22 µs of an empty plugin's, where it
	// was 30 to 50 µs behind. Blocking system calls (fsync of a CDI spec)
	// still hand the processor to other goroutines.
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(1)
	}
	os.Exit(cli.ExitCode(run()))
}

func run() error {
	fs := cli.NewFlagSet("Usage:\n" +
		"  sandbox-device-plugin [flags]            advertise vfio-bound GPUs to the kubelet (one resource per\n" +
		"                                           model, or P_GPU_ALIAS), with health, NUMA, VFIO device nodes\n" +
		"                                           and CDI devices, until SIGTERM; the CDI specs stay after it\n" +
		"  sandbox-device-plugin uninstall [flags]  remove the passthrough CDI specs from --cdi-root")
	var cfg sandboxplugin.Config
	var logFormat, logLevel string
	fs.StringVar(&cfg.PluginDir, "device-plugin-path", deviceplugin.DefaultDir, "the kubelet's device-plugin directory")
	fs.StringVar(&cfg.SysfsRoot, "sysfs-root", vfio.DefaultSysfsRoot, "sysfs mount")
	fs.StringVar(&cfg.DevRoot, "dev-root", vfio.DefaultDevRoot, "/dev of the host")
	fs.StringVar(&cfg.CDIRoot, "cdi-root", cdi.DefaultRoot, "directory for the CDI specs")
	fs.StringVar(&cfg.VFIOMode, "vfio-mode", "auto", "auto, legacy (/dev/vfio/<group>) or iommufd (/dev/vfio/devices/vfioN)")
	fs.StringVar(&cfg.GPUAlias, "gpu-alias", "", "advertise every GPU under nvidia.com/<alias> (e.g. pgpu) instead of per-model names")
	fs.StringVar(&cfg.NVSwitchAlias, "nvswitch-alias", sandboxplugin.DefaultNVSwitchAlias, "resource name for NVSwitches; empty for per-model names")
	fs.StringVar(&cfg.Select, "select", vfio.DefaultSelect, "vendor[:device] hex ids to advertise; 10de means NVIDIA GPUs and NVSwitches")
	fs.StringVar(&cfg.HealthAddress, "health-address", "", "address for /healthz, /readyz and /metrics, e.g. :8081 (empty: none)")
	fs.StringVar(&cfg.PCIIDs, "pci-ids", "", "pci.ids file for model names (default: go-nvlib's copy, built in, for NVIDIA's devices)")
	fs.DurationVar(&cfg.PollInterval, "health-poll-interval", sandboxplugin.DefaultPollInterval, "how often driver links are checked for changes /dev does not show")
	fs.DurationVar(&cfg.RescanInterval, "rescan-interval", sandboxplugin.DefaultRescanInterval, "how often everything is read again")
	fs.StringVar(&logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	for flag, env := range map[string]string{
		"device-plugin-path": "DEVICE_PLUGIN_PATH", "sysfs-root": "SYSFS_ROOT", "dev-root": "DEV_ROOT",
		"cdi-root": "CDI_ROOT", "vfio-mode": "VFIO_MODE", "gpu-alias": "P_GPU_ALIAS",
		"nvswitch-alias": "NVSWITCH_ALIAS", "select": "VFIO_SELECT", "health-address": "HEALTH_ADDRESS",
		"pci-ids": "PCI_IDS", "health-poll-interval": "HEALTH_POLL_INTERVAL", "rescan-interval": "RESCAN_INTERVAL",
		"log-format": "LOG_FORMAT", "log-level": "LOG_LEVEL",
	} {
		fs.Env(flag, env)
	}
	args, err := fs.Parse(os.Args[1:], os.LookupEnv)
	// Once started, a collection at a quarter more heap than is live,
	// unless GOGC says otherwise. The idle plugin's heap grows by its
	// polls and rescans (about 13 KB/s on an 8-GPU node) and at Go's
	// default reaches 4 MiB before each collection, which stays resident:
	// over three idle minutes RssAnon rose from 2.6 to past 4.3 MiB, where
	// 25 held it at 4.0. Such a collection takes well under a millisecond,
	// once in tens of seconds. Start-up keeps the default: at 25 its
	// collections cost 2 to 3 ms to registered.
	if os.Getenv("GOGC") == "" {
		cfg.IdleGCPercent = 25
	}
	if errors.Is(err, pflag.ErrHelp) {
		return nil
	}
	uninstall := err == nil && len(args) == 1 && args[0] == "uninstall"
	if err == nil && len(args) > 0 && !uninstall {
		err = cli.Usagef("unexpected arguments %q", args)
	}
	if err == nil {
		cfg.Log, err = cli.NewLogger(os.Stderr, logFormat, logLevel)
	}
	switch {
	case err == nil && uninstall:
		err = sandboxplugin.Uninstall(cfg)
	case err == nil:
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
		defer stop()
		err = sandboxplugin.Run(ctx, cfg)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "sandbox-device-plugin: %v\n", err)
	}
	return err
}
