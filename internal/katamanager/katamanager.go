// Package katamanager is the kata-manager agent: it pulls the Kata guest
// artifacts of each configured runtime class, points their Kata
// configuration at them, registers the runtime classes in containerd and
// enables CDI there. What it sets up is node state that running pods use:
// stopping leaves it in place, and Uninstall takes it out.
package katamanager

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/sirupsen/logrus"

	"github.com/gpu-sandbox/gpu-sandbox/internal/atomicfile"
	"github.com/gpu-sandbox/gpu-sandbox/internal/cli"
	"github.com/gpu-sandbox/gpu-sandbox/internal/modprobe"
	"github.com/gpu-sandbox/gpu-sandbox/internal/probe"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/artifacts"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/containerd"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/kata"
)

// Defaults of the agent.
const (
	DefaultReconcileInterval = 5 * time.Minute
	DefaultRestartTimeout    = containerd.DefaultRestartTimeout
	PIDFile                  = "k8s-kata-manager.pid"

	// restartRetryInterval bounds the wait before a failed containerd
	// restart is tried again: the node runs no pods while it is down.
	restartRetryInterval = 10 * time.Second
)

// Annotations Kata runtimes accept from pods and containers.
var (
	podAnnotations       = []string{"io.katacontainers.*", "cdi.k8s.io/*"}
	containerAnnotations = []string{"io.katacontainers.*"}
	kernelModules        = []string{"vhost_vsock", "vhost_net"}
)

// Config is everything the agent takes from its flags and environment.
type Config struct {
	ConfigFile       string
	ArtifactsDir     string // overrides the file's artifactsDir when set
	ContainerdConfig string
	ContainerdDropIn string // "" edits ContainerdConfig in place
	ReplaceRuntimes  bool   // take over runtimes of our names that others defined
	Runtime          string // the node's container runtime: only containerd is supported
	// DefaultRuntimeClass is the GPU Operator's default handler; logged only.
	DefaultRuntimeClass string
	NodeName            string // logged
	ContainerdSocket    string
	RestartMode         string
	RestartTimeout      time.Duration
	LoadKernelModules   bool
	CDIEnabled          bool
	CDIRoot             string
	HostRoot            string
	PullSecretsDir      string
	RemoveArtifacts     bool
	CleanupOnExit       bool
	Once                bool
	HealthAddress       string
	ReconcileInterval   time.Duration

	Log *logrus.Logger
}

type agent struct {
	cfg       Config
	log       *logrus.Logger
	file      *FileConfig
	editor    *containerd.Editor
	restarter *containerd.Restarter
	secrets   secrets
	ready     atomic.Bool
	reason    atomic.Pointer[string] // why not ready

	failures    map[string]int       // runtime class → failed reconciles in a row
	retryAt     map[string]time.Time // runtime class → no pull before
	restartOwed string               // why containerd has not loaded what was written; "" when it has
	release     containerd.Release   // the containerd on the node, as it last said
}

// containerdRelease is the running containerd's release line, whose rules
// decide how its configuration is read; the last one it told, or zero
// (the configuration's schema decides) when it never answered.
func (a *agent) containerdRelease(ctx context.Context) containerd.Release {
	r, err := a.restarter.Release(ctx)
	switch {
	case err == nil && r != a.release:
		a.log.WithFields(logrus.Fields{"socket": a.cfg.ContainerdSocket, "release": r.String()}).Info("containerd release")
		a.release = r
	case err != nil && a.release.IsZero():
		a.log.WithError(err).Debug("containerd's release unknown; its configuration's version decides")
	}
	return a.release
}

// containerdDirs lists the directories whose files make up containerd's
// configuration: the main file's (and its link target's), the drop-in's,
// and those of every import, so that a file another tool adds or changes
// there (nvidia-ctk's drop-in, say) is seen at once.
func (a *agent) containerdDirs() []string {
	dirs := []string{filepath.Dir(a.cfg.ContainerdConfig)}
	if t, err := filepath.EvalSymlinks(a.cfg.ContainerdConfig); err == nil {
		dirs = append(dirs, filepath.Dir(t))
	}
	if d := a.dropInPath(); d != "" {
		dirs = append(dirs, filepath.Dir(d))
	}
	release := a.release
	if release.IsZero() {
		release = containerd.Release17
	}
	if e, err := containerd.LoadEffective(a.cfg.ContainerdConfig, release); err == nil {
		dirs = append(dirs, e.Dirs...)
	}
	return dirs
}

// dropInPath is the drop-in as a path here: relative ones are relative to
// the main configuration's directory.
func (a *agent) dropInPath() string {
	d := a.cfg.ContainerdDropIn
	if d != "" && !filepath.IsAbs(d) {
		d = filepath.Join(filepath.Dir(a.cfg.ContainerdConfig), d)
	}
	return d
}

func newAgent(cfg Config) (*agent, error) {
	switch cfg.Runtime {
	case "containerd", "":
	case "crio", "cri-o":
		return nil, fmt.Errorf("runtime %q: kata-manager configures containerd only; CRI-O is not supported (docs/operator.md)", cfg.Runtime)
	default:
		return nil, cli.Usagef("runtime %q: want containerd", cfg.Runtime)
	}
	file, err := LoadConfig(cfg.ConfigFile)
	if errors.Is(err, fs.ErrNotExist) {
		// As NVIDIA's kata-manager: no file means its defaults.
		cfg.Log.WithField("configFile", cfg.ConfigFile).Warn("configuration file not found: no runtime classes until it appears")
		file, err = &FileConfig{ArtifactsDir: DefaultArtifactsDir}, nil
	}
	if err != nil {
		return nil, err
	}
	cfg.Log.WithFields(logrus.Fields{"node": cfg.NodeName, "operatorDefaultRuntime": cfg.DefaultRuntimeClass,
		"containerdConfig": cfg.ContainerdConfig, "socket": cfg.ContainerdSocket}).Info("kata-manager starting")
	mode, err := containerd.ParseRestartMode(cfg.RestartMode)
	if err != nil {
		return nil, &cli.UsageError{Err: err}
	}
	if cfg.ReconcileInterval <= 0 || cfg.RestartTimeout <= 0 {
		return nil, cli.Usagef("reconcile interval and restart timeout must be positive")
	}
	a := &agent{
		cfg: cfg, log: cfg.Log, file: file,
		editor:    containerd.NewEditor(cfg.ContainerdConfig, cfg.ContainerdDropIn),
		restarter: containerd.NewRestarter(mode, cfg.ContainerdSocket, containerd.WithHostRoot(cfg.HostRoot), containerd.WithTimeout(cfg.RestartTimeout)),
		failures:  map[string]int{},
		retryAt:   map[string]time.Time{},
	}
	if a.artifactsDir() == "" {
		return nil, cli.Usagef("no artifacts directory: set artifactsDir in %s or KATA_ARTIFACTS_DIR", cfg.ConfigFile)
	}
	a.setNotReady("the first full reconcile has not finished")
	if cfg.PullSecretsDir != "" {
		a.secrets = dirSecrets{dir: cfg.PullSecretsDir}
	}
	return a, nil
}

func (a *agent) artifactsDir() string {
	if a.cfg.ArtifactsDir != "" {
		return a.cfg.ArtifactsDir
	}
	return a.file.ArtifactsDir
}

// Run reconciles once (Once) or until ctx ends. Stopping leaves what it set
// up in place, unless CleanupOnExit.
func Run(ctx context.Context, cfg Config) error {
	a, err := newAgent(cfg)
	if err != nil {
		return err
	}
	if cfg.Once {
		return a.reconcile(ctx)
	}
	return a.run(ctx)
}

// Uninstall takes out of containerd's configuration what kata-manager added
// and restarts containerd once when that changed it; with RemoveArtifacts
// the runtime classes' artifacts go too. It is what an administrator (or a
// deletion Job) runs once no pod uses the runtime classes any more.
func Uninstall(ctx context.Context, cfg Config) error {
	a, err := newAgent(cfg)
	if err != nil {
		return err
	}
	a.clearPIDFile()
	return a.uninstall(ctx)
}

func (a *agent) uninstall(ctx context.Context) error {
	changed, err := a.editor.Revert()
	if err != nil {
		return fmt.Errorf("give back containerd's configuration: %w", err)
	}
	if changed {
		a.log.WithField("config", a.cfg.ContainerdConfig).Info("containerd configuration given back")
		// A restart may be under way (a reconcile's, when SIGTERM came in
		// the middle of it): let it finish before asking for another.
		_ = a.restarter.WaitReady(ctx)
		if restarted, err := a.restarter.Restart(ctx); err != nil {
			return fmt.Errorf("containerd has not loaded its configuration without the runtime classes: %w", err)
		} else if restarted {
			a.log.Info("containerd restarted and answering")
		} else {
			a.log.Warn("restart mode none: restart containerd to drop the runtime classes")
		}
	}
	if a.cfg.RemoveArtifacts {
		for _, rc := range a.file.RuntimeClasses {
			a.removeArtifacts(rc.Name)
		}
	}
	return nil
}

// reconcile brings the node to the configuration: every runtime class on
// its own, a failing one reported without stopping the others.
func (a *agent) reconcile(ctx context.Context) error {
	// A containerd configuration that cannot be edited stops everything
	// before anything is pulled or written.
	if _, err := containerd.Load(a.cfg.ContainerdConfig); err != nil {
		return err
	}
	var errs []error
	if a.cfg.LoadKernelModules {
		loader := modprobe.New(a.cfg.HostRoot)
		for _, m := range kernelModules {
			if err := loader.LoadModule(ctx, m); err != nil {
				errs = append(errs, err)
			}
		}
	}
	var runtimes []containerd.Runtime
	for _, rc := range a.file.RuntimeClasses {
		r, err := a.reconcileClass(ctx, rc)
		if err != nil {
			errs = append(errs, fmt.Errorf("runtime class %s: %w", rc.Name, err))
		}
		if r != nil {
			runtimes = append(runtimes, *r)
		}
	}
	settings := containerd.Settings{Runtimes: runtimes, Release: a.containerdRelease(ctx), Replace: a.cfg.ReplaceRuntimes}
	if a.cfg.CDIEnabled {
		settings.CDISpecDirs = []string{"/etc/cdi", a.cfg.CDIRoot}
	}
	changed, err := a.editor.Apply(settings)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	if changed {
		a.log.WithFields(logrus.Fields{"config": a.cfg.ContainerdConfig, "drop-in": a.dropInPath(),
			"runtimes": names(runtimes)}).Info("containerd configuration written")
		// Never restart containerd into a configuration its own loader
		// refuses: take our entries out again instead.
		if _, err := a.restarter.Check(ctx, a.cfg.ContainerdConfig); err != nil {
			if _, rerr := a.editor.Revert(); rerr != nil {
				err = fmt.Errorf("%w; taking our entries out again failed too: %w", err, rerr)
			}
			return errors.Join(append(errs, err)...)
		}
	}
	if err := a.loadConfig(ctx, changed); err != nil {
		errs = append(errs, err)
	}
	a.removeDropped()
	return errors.Join(errs...)
}

// loadConfig makes containerd read its configuration as written: it is
// restarted when this reconcile changed the configuration, when an earlier
// restart did not happen, or when the containerd running now started
// before our last change (a kata-manager that died between writing and
// restarting). A restart that did not happen is an error, and the restart
// stays owed, until a containerd that started after the change answers.
// With restart mode none the administrator restarts it: the restart is
// owed, not failed, and the daemon is not ready until it happened.
func (a *agent) loadConfig(ctx context.Context, changed bool) error {
	owed := changed || a.restartOwed != ""
	if stamp, wrote := a.editor.LastChange(); wrote && !changed {
		// Without an answer (no containerd, no PID) nothing is known:
		// keep what this process knew.
		if loaded, err := a.restarter.Loaded(stamp); err == nil {
			owed = !loaded
		}
	}
	if !owed {
		if a.restartOwed != "" {
			a.log.WithField("socket", a.cfg.ContainerdSocket).Info("containerd has loaded the configuration")
		}
		a.restartOwed = ""
		return nil
	}
	restarted, err := a.restarter.Restart(ctx)
	switch {
	case err != nil:
		err = fmt.Errorf("containerd has not loaded its new configuration: %w", err)
		a.restartOwed = err.Error()
		return err
	case !restarted:
		if a.restartOwed == "" {
			a.log.WithField("socket", a.cfg.ContainerdSocket).Warn("restart mode none: restart containerd to load its new configuration")
		}
		a.restartOwed = "containerd has not loaded its new configuration: restart mode none: restart containerd (" + a.cfg.ContainerdSocket + ")"
		return nil
	}
	a.restartOwed = ""
	a.log.WithField("socket", a.cfg.ContainerdSocket).Info("containerd restarted and answering")
	return nil
}

func names(rs []containerd.Runtime) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.Name
	}
	return out
}

// configName is the rewritten Kata configuration in a runtime class's
// directory.
func configName(rc string) string { return "gpu-sandbox-" + rc + ".toml" }

// reconcileClass pulls a runtime class's artifacts, with its Kata
// configuration rewritten before the new version becomes current, and
// returns its containerd runtime. While pulls fail, the runtime keeps
// serving the artifacts it has, if any.
func (a *agent) reconcileClass(ctx context.Context, rc RuntimeClass) (*containerd.Runtime, error) {
	dir := filepath.Join(a.artifactsDir(), rc.Name)
	runtime := &containerd.Runtime{
		Name: rc.Name, Type: "io.containerd." + rc.Name + ".v2",
		ConfigPath:     filepath.Join(dir, configName(rc.Name)),
		PodAnnotations: podAnnotations, ContainerAnnotations: containerAnnotations,
	}
	current := func() *containerd.Runtime {
		if _, err := os.Stat(runtime.ConfigPath); err == nil {
			return runtime
		}
		return nil
	}
	if time.Now().Before(a.retryAt[rc.Name]) {
		return current(), fmt.Errorf("retrying at %s after %d failures", a.retryAt[rc.Name].Format(time.TimeOnly), a.failures[rc.Name])
	}
	opts := artifacts.Options{
		PlainHTTP: rc.Artifacts.PlainHTTP, CAFile: rc.Artifacts.CAFile, Platform: rc.Artifacts.Platform,
		Progress: progressLogger(a.log, rc.Artifacts.URL),
		Prepare: func(staging, final string, files []artifacts.File) error {
			return writeKataConfig(rc.Name, staging, final, files)
		},
	}
	fail := func(err error) (*containerd.Runtime, error) {
		a.failures[rc.Name]++
		backoff := min(time.Duration(1<<min(a.failures[rc.Name], 10))*5*time.Second, 5*time.Minute)
		a.retryAt[rc.Name] = time.Now().Add(backoff)
		return current(), err
	}
	if name := rc.Artifacts.PullSecret; name != "" {
		if a.secrets == nil {
			s, err := newAPISecrets()
			if err != nil {
				return fail(fmt.Errorf("pull secret %q: %w", name, err))
			}
			a.secrets = s
		}
		b, err := a.secrets.dockerConfig(ctx, name)
		if err != nil {
			return fail(err)
		}
		opts.DockerConfig = b
	}
	res, err := artifacts.Pull(ctx, rc.Artifacts.URL, dir, opts)
	if err != nil {
		return fail(err)
	}
	// A version pulled by an older run, or whose file someone removed,
	// gets its configuration again.
	if _, err := os.Stat(runtime.ConfigPath); err != nil {
		if err := writeKataConfig(rc.Name, res.Path, res.Path, res.Files); err != nil {
			return fail(err)
		}
	}
	delete(a.failures, rc.Name)
	delete(a.retryAt, rc.Name)
	entry := a.log.WithFields(logrus.Fields{"runtimeClass": rc.Name, "reference": res.Reference, "digest": res.Digest})
	if res.Changed {
		entry.WithField("dir", dir).Info("artifacts pulled")
	} else {
		entry.Debug("artifacts unchanged")
	}
	return runtime, nil
}

// writeKataConfig writes the runtime class's Kata configuration, pointed at
// the files of the version that will live at final, into dir.
func writeKataConfig(rc, dir, final string, files []artifacts.File) error {
	names := make([]string, len(files))
	for i, f := range files {
		names[i] = f.Name
		if f.Name == configName(rc) {
			return fmt.Errorf("the artifact has a file named %s, which kata-manager writes", f.Name)
		}
	}
	src, err := kata.ConfigFor(rc, names)
	if err != nil {
		return err
	}
	b, err := os.ReadFile(filepath.Join(dir, src))
	if err != nil {
		return err
	}
	out, err := kata.Rewrite(b, final, names, kata.Options{RuntimeClass: rc})
	if err != nil {
		return fmt.Errorf("%s: %w", src, err)
	}
	target := filepath.Join(dir, configName(rc))
	_ = atomicfile.RemoveTemps(target)
	_, err = atomicfile.WriteFileIfChanged(target, out, 0o644)
	return err
}

// removeDropped removes the directories of runtime classes no longer in the
// configuration: links this agent made, with their versions beside them.
func (a *agent) removeDropped() {
	entries, err := os.ReadDir(a.artifactsDir())
	if err != nil {
		return
	}
	for _, e := range entries {
		name := e.Name()
		if e.Type()&os.ModeSymlink == 0 || slices.ContainsFunc(a.file.RuntimeClasses, func(rc RuntimeClass) bool { return rc.Name == name }) {
			continue
		}
		versions := filepath.Join(a.artifactsDir(), "."+name+".versions")
		if _, err := os.Stat(versions); err != nil {
			continue // not ours
		}
		a.removeArtifacts(name)
	}
}

func (a *agent) removeArtifacts(name string) {
	dir := filepath.Join(a.artifactsDir(), name)
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		a.log.WithError(err).WithField("dir", dir).Warn("remove artifacts")
		return
	}
	if err := os.RemoveAll(filepath.Join(a.artifactsDir(), "."+name+".versions")); err != nil {
		a.log.WithError(err).WithField("dir", dir).Warn("remove artifacts")
		return
	}
	a.log.WithField("runtimeClass", name).Info("artifacts removed")
}

// run is the daemon: reconcile, mark ready, and keep reconciling on a
// timer, on configuration changes, on drift in containerd's configuration
// and, for the CDI spec, on GPUs coming and going; clean up on the way out.
func (a *agent) run(ctx context.Context) error {
	// A PID file left by a process that crashed must not make this one look ready.
	a.clearPIDFile()
	if a.cfg.HealthAddress != "" {
		stop, err := a.serveHTTP(a.cfg.HealthAddress)
		if err != nil {
			return err
		}
		defer stop()
	}
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return err
	}
	defer w.Close()
	watched := map[string]string{filepath.Dir(a.cfg.ConfigFile): "config"} // directory → what changes there
	watch := func() {
		for _, dir := range a.containerdDirs() {
			if watched[dir] == "" {
				watched[dir] = "containerd"
			}
		}
		for dir := range watched {
			_ = w.Add(dir) // a directory that is missing now is seen on the next reconcile
		}
	}
	watch()
	defer a.cleanup()

	timer := time.NewTimer(0)
	defer timer.Stop()
	settle := time.NewTimer(time.Hour)
	settle.Stop()
	pending := map[string]bool{}
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev := <-w.Events:
			kind := watched[filepath.Dir(ev.Name)]
			if kind == "config" ||
				(kind == "containerd" && (ev.Name == a.cfg.ContainerdConfig || strings.HasSuffix(ev.Name, ".toml"))) {
				pending[kind] = true
				settle.Reset(200 * time.Millisecond) // one reconcile for a burst of events, our own writes included
			}
		case err := <-w.Errors:
			a.log.WithError(err).Warn("file watch overflowed; reconciling")
			timer.Reset(0)
		case <-settle.C:
			if pending["config"] {
				if file, err := LoadConfig(a.cfg.ConfigFile); err != nil {
					a.log.WithError(err).Error("configuration not reloaded; keeping the previous one")
				} else {
					a.file = file
					a.log.Info("configuration reloaded")
				}
			}
			if pending["config"] || pending["containerd"] {
				timer.Reset(0)
			}
			clear(pending)
		case <-timer.C:
			err := a.reconcile(ctx)
			if ctx.Err() != nil {
				return nil
			}
			watch()
			switch {
			case a.restartOwed != "":
				// Ready or not before: the node runs without what was written.
				a.setNotReady(a.restartOwed)
			case err == nil:
				if err := a.markReady(); err != nil {
					return err
				}
			case !a.ready.Load():
				a.setNotReady("the first full reconcile has not succeeded: " + err.Error())
			}
			if err != nil {
				a.log.WithError(err).Error("reconcile")
			}
			timer.Reset(a.nextReconcile())
		}
	}
}

// nextReconcile is the periodic interval, or sooner for a class to retry.
func (a *agent) nextReconcile() time.Duration {
	next := a.cfg.ReconcileInterval
	if a.restartOwed != "" {
		next = min(next, restartRetryInterval)
	}
	for _, at := range a.retryAt {
		next = min(next, max(time.Until(at), time.Second))
	}
	return next
}

func (a *agent) pidFile() string { return filepath.Join(a.artifactsDir(), PIDFile) }

// clearPIDFile removes the readiness marker the GPU Operator's probe reads
// (it checks that the PID in it is alive).
func (a *agent) clearPIDFile() {
	_ = atomicfile.RemoveTemps(a.pidFile())
	_ = atomicfile.Remove(a.pidFile())
}

func (a *agent) markReady() error {
	if a.ready.Load() {
		return nil
	}
	if err := os.MkdirAll(a.artifactsDir(), 0o755); err != nil {
		return err
	}
	if err := atomicfile.WriteFile(a.pidFile(), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		return fmt.Errorf("mark ready: %w", err)
	}
	a.ready.Store(true)
	a.log.WithField("pidFile", a.pidFile()).Info("every runtime class is set up and containerd has loaded it; ready")
	// The first reconcile's buffers (pulls, TOML trees) are garbage now:
	// return them to the kernel at once rather than over minutes, since
	// idle RSS is what every node pays.
	go debug.FreeOSMemory()
	return nil
}

func (a *agent) setNotReady(reason string) {
	a.reason.Store(&reason)
	if a.ready.Swap(false) {
		a.clearPIDFile()
	}
}

// cleanup runs when the daemon stops. By default everything stays: runtime
// classes, Kata configurations and artifacts are node state that running
// pods use, and the next kata-manager finds them in place. With
// CleanupOnExit it does what Uninstall does.
func (a *agent) cleanup() {
	a.ready.Store(false)
	a.clearPIDFile()
	if !a.cfg.CleanupOnExit {
		a.log.Info("stopped; runtime classes stay in place (kata-manager uninstall removes them)")
		return
	}
	// The cleanup runs after the context ended: give it its own time.
	ctx, cancel := context.WithTimeout(context.Background(), a.cfg.RestartTimeout+10*time.Second)
	defer cancel()
	if err := a.uninstall(ctx); err != nil {
		a.log.WithError(err).Error("cleanup on exit")
		return
	}
	a.log.Info("stopped; runtime classes removed (--cleanup-on-exit)")
}

// serveHTTP serves /healthz and /readyz.
func (a *agent) serveHTTP(addr string) (func(), error) {
	srv, err := probe.Listen(addr, probe.Handlers{Ready: func() string {
		if a.ready.Load() {
			return ""
		}
		return *a.reason.Load()
	}})
	if err != nil {
		return nil, fmt.Errorf("--health-address %q: %w", addr, err)
	}
	return srv.Close, nil
}
