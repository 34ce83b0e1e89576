// Command vfio-manager binds NVIDIA GPUs, with their IOMMU group mates, to
// vfio-pci and gives them back. Installed as vfio-manage it serves the GPU
// Operator's "vfio-manage bind --all" unchanged.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/spf13/pflag"

	"github.com/gpu-sandbox/gpu-sandbox/internal/cli"
	"github.com/gpu-sandbox/gpu-sandbox/internal/kubeapi"
	"github.com/gpu-sandbox/gpu-sandbox/internal/vfiomanager"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
)

const usage = `Usage: %[1]s [flags] COMMAND

Commands:
  bind --all | --device-id BDF[,BDF...]    give devices and their IOMMU group mates to vfio
  unbind --all | --device-id BDF[,BDF...]  give the devices this tool bound back to the driver they had;
                                           a device a process holds (a running VM) is refused, naming it
  status [--json]                          list the devices bind --all would touch, and who holds them
  run                                      bind the GPUs the policy gives VMs (all by default), mark ready,
                                           keep following the policy; stopping leaves every binding in
                                           place (bindings are node state)
  ready                                    exit 0 once run has marked itself ready in this boot (probes)`

func main() {
	os.Exit(cli.ExitCode(run()))
}

func run() error {
	fs := cli.NewFlagSet(fmt.Sprintf(usage, filepath.Base(os.Args[0])))
	var cfg vfiomanager.Config
	var logFormat, logLevel string
	fs.BoolVarP(&cfg.All, "all", "a", false, "act on every selected device")
	fs.StringSliceVarP(&cfg.DeviceIDs, "device-id", "d", nil, "act on these PCI addresses (repeat or separate with commas)")
	fs.BoolVar(&cfg.JSON, "json", false, "status: print JSON")
	fs.StringVar(&cfg.HostRoot, "host-root", vfio.DefaultHostRoot, "host root file system (modules.alias, modprobe)")
	fs.StringVar(&cfg.SysfsRoot, "sysfs-root", vfio.DefaultSysfsRoot, "sysfs mount")
	fs.StringVar(&cfg.DevRoot, "dev-root", vfio.DefaultDevRoot, "/dev of the host")
	fs.StringVar(&cfg.StateDir, "state-dir", "", "where the drivers devices had before binding are recorded (default: <host-root>/run/nvidia/vfio-manager, on the host where the container's /run is its own)")
	fs.StringVar(&cfg.ProcRoot, "proc-root", "", "the host's /proc, whose processes' open files tell which devices are in use (default: <host-root>/proc when the host root is mounted, else /proc: run the container with hostPID)")
	fs.StringVar(&cfg.ReadyFile, "ready-file", "", "run: file written once every device is bound (default: <state-dir>/ready)")
	fs.StringVar(&cfg.HealthAddress, "health-address", "", "run: address for /healthz, /readyz and /metrics, e.g. :8083 (empty: none)")
	fs.DurationVar(&cfg.ReconcileInterval, "reconcile-interval", vfiomanager.DefaultReconcileInterval, "run: how often the node is looked at again once all is bound")
	fs.StringVar(&cfg.VMGPUs, "vm-gpus", "all", "run, status: the GPUs for VMs when neither the node nor --vm-gpus-file says: all, none, a count, or gpu<N>, PCI addresses, numa<N> and models, comma separated")
	fs.StringVar(&cfg.VMGPUsFile, "vm-gpus-file", "", "run, status: a file holding the GPUs for VMs, as --vm-gpus; watched; a missing file says nothing")
	fs.BoolVar(&cfg.NodePolicy, "node-policy", false, "run, status: read the GPUs for VMs off the node ("+vfiomanager.PolicyKey+" annotation or label, "+vfiomanager.WorkloadConfigLabel+"), watch it, and post events and count labels to it; needs --node-name and a service account that may get, watch and patch nodes and create events")
	fs.StringVar(&cfg.NodeName, "node-name", "", "the node this agent runs on (the downward API's spec.nodeName)")
	fs.StringVar(&cfg.ServiceAccountDir, "service-account-dir", kubeapi.ServiceAccountDir, "where the pod's service account is mounted")
	fs.DurationVar(&cfg.PolicySettle, "policy-settle", vfiomanager.DefaultPolicySettle, "run: how long a changed policy must hold still before it is applied")
	fs.BoolVar(&cfg.Force, "force", false, "unbind: also take devices a process holds open, which pulls them out of a running VM (the kernel asks the VMM to let go and waits), and devices vfio-manager did not bind, which are left without a driver")
	fs.StringVar(&cfg.Select, "select", vfio.DefaultSelect, "vendor[:device] hex ids to handle, comma separated; 10de means NVIDIA GPUs")
	fs.BoolVar(&cfg.BindNVSwitches, "bind-nvswitches", false, "also bind NVIDIA NVSwitches")
	fs.BoolVar(&cfg.BindNVSwitches, "unbind-nvswitches", false, "also unbind NVIDIA NVSwitches (vfio-manage's name for the same selection)")
	fs.DurationVar(&cfg.Timeout, "timeout", vfio.DefaultTimeout, "how long one device may take to change driver")
	fs.BoolVar(&cfg.DryRun, "dry-run", false, "report what would change and change nothing")
	fs.BoolVar(&cfg.LoadModules, "load-modules", true, "load missing vfio drivers with the host's modprobe")
	fs.StringVar(&cfg.PCIIDs, "pci-ids", "", "pci.ids file for device names (default: go-nvlib's copy, built in, for NVIDIA's devices)")
	fs.StringVar(&logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	for flag, env := range map[string]string{
		"all": "ALL", "device-id": "DEVICE_ID", "host-root": "HOST_ROOT", "sysfs-root": "SYSFS_ROOT",
		"dev-root": "DEV_ROOT", "state-dir": "STATE_DIR", "ready-file": "READY_FILE", "select": "VFIO_SELECT",
		"proc-root": "PROC_ROOT", "health-address": "HEALTH_ADDRESS", "reconcile-interval": "RECONCILE_INTERVAL",
		"force": "FORCE", "vm-gpus": "VM_GPUS", "vm-gpus-file": "VM_GPUS_FILE", "node-policy": "NODE_POLICY",
		"node-name": "NODE_NAME", "service-account-dir": "SERVICE_ACCOUNT_DIR", "policy-settle": "POLICY_SETTLE",
		"bind-nvswitches": "BIND_NVSWITCHES", "unbind-nvswitches": "UNBIND_NVSWITCHES", "timeout": "VFIO_TIMEOUT", "dry-run": "DRY_RUN",
		"load-modules": "LOAD_MODULES", "pci-ids": "PCI_IDS", "json": "JSON", "log-format": "LOG_FORMAT",
		"log-level": "LOG_LEVEL",
	} {
		fs.Env(flag, env)
	}
	args, err := fs.Parse(os.Args[1:], os.LookupEnv)
	if errors.Is(err, pflag.ErrHelp) {
		return nil
	}
	if err != nil {
		return report(err)
	}
	if len(args) > 1 {
		return report(cli.Usagef("unexpected arguments %q", args[1:]))
	}
	if len(args) == 1 {
		cfg.Command = args[0]
	}
	if cfg.Log, err = cli.NewLogger(os.Stderr, logFormat, logLevel); err != nil {
		return report(err)
	}
	hostPaths(&cfg)
	cfg.Out = os.Stdout
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	return report(vfiomanager.Run(ctx, cfg))
}

// hostPaths fills the paths whose defaults follow the host root: under the
// GPU Operator's DaemonSet (the host's / at /host, no hostPID, the
// container's own /run) state must live on the host to outlive the
// container, and the host's processes are those of <host-root>/proc.
func hostPaths(cfg *vfiomanager.Config) {
	if cfg.StateDir == "" {
		cfg.StateDir = filepath.Join(cfg.HostRoot, vfiomanager.DefaultStateDir)
	}
	if cfg.ReadyFile == "" {
		cfg.ReadyFile = filepath.Join(cfg.StateDir, "ready")
	}
	if cfg.ProcRoot == "" {
		cfg.ProcRoot = vfio.DefaultProcRoot
		if p := filepath.Join(cfg.HostRoot, "proc"); filepath.Clean(cfg.HostRoot) != "/" {
			if _, err := os.Stat(filepath.Join(p, "1")); err == nil {
				cfg.ProcRoot = p
			}
		}
	}
}

func report(err error) error {
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", os.Args[0], err)
		if cli.ExitCode(err) == cli.ExitUsage {
			fmt.Fprintf(os.Stderr, "Run '%s --help' for usage.\n", os.Args[0])
		}
	}
	return err
}
