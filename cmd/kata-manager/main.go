// Command kata-manager sets up Kata Containers runtime classes for GPU
// passthrough on a node: guest artifacts from an OCI registry, the Kata
// configuration, containerd's runtime entries and the nvidia.com/pgpu CDI
// spec. "kata-manager pull" pulls one artifact, for administrators.
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
	"github.com/gpu-sandbox/gpu-sandbox/internal/katamanager"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/cdi"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/containerd"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
)

const usage = `Usage:
  kata-manager [flags]                  reconcile until SIGTERM (or once with --once); stopping leaves
                                        runtime classes, Kata configurations and artifacts in place
  kata-manager uninstall [flags]        take the runtime classes out of containerd's configuration and
                                        restart it (with --remove-artifacts, remove the artifacts too)
  kata-manager pull [flags] REF DIR     pull one artifact into DIR and print its digest and files`

func main() {
	os.Exit(cli.ExitCode(run()))
}

func run() error {
	fs := cli.NewFlagSet(usage)
	var cfg katamanager.Config
	var pull katamanager.PullConfig
	var logFormat, logLevel string
	fs.StringVar(&cfg.ConfigFile, "config-file", katamanager.DefaultConfigFile, "runtime classes and their artifacts (YAML, as the GPU Operator writes it)")
	fs.StringVar(&cfg.ArtifactsDir, "artifacts-dir", "", "where artifacts go; overrides artifactsDir of the config file")
	fs.StringVar(&cfg.ContainerdConfig, "containerd-config", containerd.DefaultConfigPath, "containerd's main configuration")
	fs.StringVar(&cfg.ContainerdDropIn, "containerd-drop-in", containerd.DefaultDropInPath, "drop-in file for the runtime entries, relative to the main configuration's directory (imported so) or absolute as on the host; empty edits the main configuration in place")
	fs.BoolVar(&cfg.ReplaceRuntimes, "replace-runtimes", false, "take over a runtime of a runtime class's name that someone else defined (kata-deploy), instead of failing; on containerd 2.x keys of theirs that ours does not set stay")
	fs.StringVar(&cfg.ContainerdSocket, "containerd-socket", containerd.DefaultSocket, "containerd's socket")
	fs.StringVar(&cfg.Runtime, "runtime", "containerd", "the node's container runtime, as the GPU Operator names it: containerd (cri-o is not supported)")
	fs.StringVar(&cfg.DefaultRuntimeClass, "containerd-runtime-class", "", "the GPU Operator's default runtime handler (nvidia): logged; kata-manager adds runtimes and never changes containerd's default")
	fs.StringVar(&cfg.NodeName, "node-name", "", "the node this runs on (the Downward API's spec.nodeName), named in the logs")
	fs.StringVar(&cfg.RestartMode, "restart-mode", string(containerd.RestartSignal), "how containerd is restarted: signal, systemd or none")
	fs.DurationVar(&cfg.RestartTimeout, "restart-timeout", katamanager.DefaultRestartTimeout, "how long containerd may take to answer after a restart")
	fs.BoolVar(&cfg.LoadKernelModules, "load-kernel-modules", true, "load vhost_vsock and vhost_net with the host's modprobe")
	fs.BoolVar(&cfg.CDIEnabled, "cdi-enabled", true, "enable CDI in containerd (the device plugin writes the specs)")
	fs.StringVar(&cfg.CDIRoot, "cdi-root", cdi.DefaultRoot, "directory of dynamic CDI specs, given to containerd with /etc/cdi")
	fs.StringVar(&cfg.HostRoot, "host-root", hostRootDefault(), "host root file system (modprobe, systemctl, the node's containerd binary); as k8s-kata-manager, /host when mounted there as the GPU Operator does")
	fs.StringVar(&cfg.PullSecretsDir, "pull-secrets-dir", "", "read pull secrets from <dir>/<name>/.dockerconfigjson instead of the Kubernetes API")
	fs.BoolVar(&cfg.RemoveArtifacts, "remove-artifacts", false, "uninstall (or --cleanup-on-exit): also remove the artifacts")
	fs.BoolVar(&cfg.CleanupOnExit, "cleanup-on-exit", false, "uninstall when stopping; off by default, since a rollout must not take runtime classes from running pods")
	fs.BoolVar(&cfg.Once, "once", false, "reconcile once and exit, removing nothing")
	fs.StringVar(&cfg.HealthAddress, "health-address", "", "address for /healthz and /readyz, e.g. :8082 (empty: none)")
	fs.DurationVar(&cfg.ReconcileInterval, "reconcile-interval", katamanager.DefaultReconcileInterval, "how often everything is checked again")
	fs.BoolVar(&pull.PlainHTTP, "plain-http", false, "pull: talk HTTP to the registry")
	fs.StringVar(&pull.CAFile, "ca-file", "", "pull: PEM file of a CA to trust")
	fs.StringVar(&pull.PullSecret, "pull-secret", "", "pull: file holding a .dockerconfigjson")
	fs.StringVar(&pull.Platform, "platform", "", "pull: os/arch of a multi-platform artifact (default: this node's)")
	fs.StringVar(&logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	for flag, env := range map[string]string{
		"config-file": "CONFIG_FILE", "artifacts-dir": "KATA_ARTIFACTS_DIR",
		"containerd-drop-in": "CONTAINERD_DROP_IN", "replace-runtimes": "REPLACE_RUNTIMES", "restart-mode": "RESTART_MODE",
		"runtime": "RUNTIME", "containerd-runtime-class": "CONTAINERD_RUNTIME_CLASS", "node-name": "NODE_NAME",
		"restart-timeout": "RESTART_TIMEOUT", "load-kernel-modules": "LOAD_KERNEL_MODULES", "cdi-enabled": "CDI_ENABLED",
		"cdi-root": "CDI_ROOT", "host-root": "HOST_ROOT",
		"pull-secrets-dir": "PULL_SECRETS_DIR", "remove-artifacts": "REMOVE_ARTIFACTS", "cleanup-on-exit": "CLEANUP_ON_EXIT",
		"once": "ONCE", "health-address": "HEALTH_ADDRESS", "reconcile-interval": "RECONCILE_INTERVAL",
		"plain-http": "PLAIN_HTTP", "ca-file": "CA_FILE", "pull-secret": "PULL_SECRET", "platform": "PLATFORM",
		"log-format": "LOG_FORMAT", "log-level": "LOG_LEVEL",
	} {
		fs.Env(flag, env)
	}
	// The GPU Operator sets both names of these.
	fs.Env("containerd-config", "CONTAINERD_CONFIG", "RUNTIME_CONFIG")
	fs.Env("containerd-socket", "CONTAINERD_SOCKET", "RUNTIME_SOCKET")
	args, err := fs.Parse(os.Args[1:], os.LookupEnv)
	if errors.Is(err, pflag.ErrHelp) {
		return nil
	}
	if err == nil {
		cfg.Log, err = cli.NewLogger(os.Stderr, logFormat, logLevel)
	}
	if err != nil {
		return report(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	switch {
	case len(args) == 0:
		return report(katamanager.Run(ctx, cfg))
	case args[0] == "uninstall":
		if len(args) != 1 {
			return report(cli.Usagef("uninstall: unexpected arguments %q", args[1:]))
		}
		return report(katamanager.Uninstall(ctx, cfg))
	case args[0] == "pull":
		if len(args) != 3 {
			return report(cli.Usagef("pull: want REF DIR, got %d arguments", len(args)-1))
		}
		pull.Reference, pull.Dir, pull.Out, pull.Log = args[1], args[2], os.Stdout, cfg.Log
		return report(katamanager.Pull(ctx, pull))
	}
	return report(cli.Usagef("unknown command %q: want uninstall, pull, or no command for the daemon", args[0]))
}

// hostRootDefault is / for kata-manager, and /host when the binary runs
// as k8s-kata-manager, the GPU Operator's name for it, whose DaemonSet
// mounts the host's root there without saying so in HOST_ROOT.
func hostRootDefault() string {
	if filepath.Base(os.Args[0]) == "k8s-kata-manager" {
		if fi, err := os.Stat("/host"); err == nil && fi.IsDir() {
			return "/host"
		}
	}
	return vfio.DefaultHostRoot
}

func report(err error) error {
	if err != nil {
		fmt.Fprintf(os.Stderr, "kata-manager: %v\n", err)
		if cli.ExitCode(err) == cli.ExitUsage {
			fmt.Fprintln(os.Stderr, "Run 'kata-manager --help' for usage.")
		}
	}
	return err
}
