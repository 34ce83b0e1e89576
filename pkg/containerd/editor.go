package containerd

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"slices"

	"github.com/pelletier/go-toml/v2"

	"github.com/gpu-sandbox/gpu-sandbox/internal/atomicfile"
)

// Runtime is a runtime entry in containerd's CRI configuration.
type Runtime struct {
	// Name is the handler a RuntimeClass names, e.g. "kata-qemu-nvidia-gpu".
	Name string
	// Type is the shim, e.g. "io.containerd.kata-qemu-nvidia-gpu.v2".
	Type string
	// Path is the shim binary (runtime_path); "" lets containerd find it.
	Path string
	// ConfigPath is the Kata configuration (options.ConfigPath).
	ConfigPath string
	// PodAnnotations and ContainerAnnotations are passed to the shim.
	PodAnnotations       []string
	ContainerAnnotations []string
}

// Settings are the entries this package maintains.
type Settings struct {
	Runtimes []Runtime
	// CDISpecDirs, when not nil, enables CDI with these spec directories
	// (containerd 1.7 and later; 1.6 ignores the keys).
	CDISpecDirs []string
}

// Editor adds and removes Settings in a containerd configuration, either in
// a drop-in file that the main configuration imports, or in the main
// configuration itself.
//
// Every write is atomic. The first change keeps a copy of the original
// (<config>.gpu-sandbox.bak) and a record of what was changed
// (<config>.gpu-sandbox.json); Revert uses them to give back the
// administrator's file: byte for byte on the drop-in route when nobody else
// changed it since, and otherwise with every foreign setting untouched.
type Editor struct {
	config string
	dropIn string
}

// NewEditor edits the configuration at configPath through the drop-in file
// dropInPath, or in place when dropInPath is "".
func NewEditor(configPath, dropInPath string) *Editor {
	return &Editor{config: configPath, dropIn: dropInPath}
}

// state is what the Editor changed, kept beside the configuration.
type state struct {
	Route       string `json:"route"` // "drop-in" or "in-place"
	DropIn      string `json:"dropIn,omitempty"`
	MainExisted bool   `json:"mainExisted"`
	// MainWritten is the SHA-256 of the main configuration as last written.
	MainWritten string `json:"mainWritten"`
	// Added lists the keys set in place, with what they held before.
	Added []change `json:"added,omitempty"`
}

type change struct {
	Path    []string `json:"path"`
	Existed bool     `json:"existed"`
	// Previous is the replaced value as a TOML document "v = ...", so that
	// integers and tables come back with their TOML types.
	Previous string `json:"previous,omitempty"`
	// Created is how many of the tables leading to the key did not exist
	// (the innermost ones): they go again when empty.
	Created int `json:"created,omitempty"`
}

func (e *Editor) statePath() string { return e.config + ".gpu-sandbox.json" }

// removeTemps clears what writes that died half-way left beside the files.
func (e *Editor) removeTemps() {
	for _, f := range []string{e.config, e.dropIn, e.statePath(), e.backupPath()} {
		if f != "" {
			_ = atomicfile.RemoveTemps(f)
		}
	}
}
func (e *Editor) backupPath() string { return e.config + ".gpu-sandbox.bak" }

func (e *Editor) loadState() (*state, error) {
	b, err := os.ReadFile(e.statePath())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %q: %w", e.statePath(), err)
	}
	var s state
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("read %q: corrupt: %w", e.statePath(), err)
	}
	return &s, nil
}

func (e *Editor) saveState(s *state) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(e.statePath(), append(b, '\n'), 0o600)
}

func digestOf(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// Apply makes the configuration hold exactly these settings: entries of
// earlier Applies that are no longer wanted go. It reports whether a file
// changed, which means containerd must be restarted to see it.
func (e *Editor) Apply(s Settings) (bool, error) {
	e.removeTemps()
	cfg, err := Load(e.config)
	if err != nil {
		return false, err
	}
	st, err := e.loadState()
	if err != nil {
		return false, err
	}
	if st == nil {
		st = &state{MainExisted: cfg.Raw != nil}
	}
	if e.dropIn == "" {
		return e.applyInPlace(cfg, st, s)
	}
	return e.applyDropIn(cfg, st, s)
}

func runtimeTable(r Runtime) map[string]any {
	t := map[string]any{
		"runtime_type":                    r.Type,
		"privileged_without_host_devices": true,
		"options":                         map[string]any{"ConfigPath": r.ConfigPath},
	}
	if r.Path != "" {
		t["runtime_path"] = r.Path
	}
	if len(r.PodAnnotations) > 0 {
		t["pod_annotations"] = r.PodAnnotations
	}
	if len(r.ContainerAnnotations) > 0 {
		t["container_annotations"] = r.ContainerAnnotations
	}
	return t
}

// defaultRuntime is the runtime containerd uses when a pod names none.
// Setting any runtime replaces containerd's built-in runtimes map, so the
// built-in runc must then be spelled out or pods without a RuntimeClass
// stop starting.
func defaultRuntime(cri map[string]any) (string, map[string]any) {
	name, _ := lookup(cri, "containerd", "default_runtime_name").(string)
	if name == "" {
		name = "runc"
	}
	if name != "runc" {
		return name, nil // only the built-in one is known
	}
	return name, map[string]any{"runtime_type": "io.containerd.runc.v2"}
}

func (e *Editor) applyDropIn(cfg *Config, st *state, s Settings) (bool, error) {
	version := cfg.Version()
	plugin, err := criPlugin(version)
	if err != nil {
		return false, err
	}
	var cri map[string]any
	if version == 3 {
		// containerd 2.x merges imported tables into the main ones.
		cri = map[string]any{}
	} else {
		// containerd 1.x replaces a plugin's table wholesale with an
		// imported one: the drop-in carries a copy of the main table.
		cri, _ = deepCopy(lookup(cfg.tree, "plugins", plugin)).(map[string]any)
		if cri == nil {
			cri = map[string]any{}
		}
		runtimes := table(cri, "containerd", "runtimes")
		if name, t := defaultRuntime(cri); t != nil && runtimes[name] == nil {
			runtimes[name] = t
		}
	}
	for _, r := range s.Runtimes {
		table(cri, "containerd", "runtimes")[r.Name] = runtimeTable(r)
	}
	if s.CDISpecDirs != nil {
		cri["enable_cdi"] = true
		cri["cdi_spec_dirs"] = s.CDISpecDirs
	}
	body, err := toml.Marshal(map[string]any{"version": version, "plugins": map[string]any{plugin: cri}})
	if err != nil {
		return false, fmt.Errorf("write containerd drop-in %q: %w", e.dropIn, err)
	}
	dropIn := append([]byte("# Written by gpu-sandbox kata-manager, which removes it when it stops.\n"+
		"# It is regenerated from "+e.config+" on every reconcile: edit that file instead.\n"), body...)

	main, err := addImport(cfg.Raw, e.dropIn, cfg.Empty())
	if err != nil {
		return false, err
	}
	if err := os.MkdirAll(filepath.Dir(e.dropIn), 0o755); err != nil {
		return false, fmt.Errorf("write containerd drop-in: %w", err)
	}
	// The drop-in first: an import of a missing file would stop containerd.
	changed, err := atomicfile.WriteFileIfChanged(e.dropIn, dropIn, 0o644)
	if err != nil {
		return false, err
	}
	st.Route, st.DropIn = "drop-in", e.dropIn
	if !bytes.Equal(main, cfg.Raw) || cfg.Raw == nil {
		if err := e.writeMain(cfg, st, main); err != nil {
			return changed, err
		}
		changed = true
	} else if st.MainWritten == "" {
		st.MainWritten = digestOf(main)
	}
	return changed, e.saveState(st)
}

// writeMain replaces the main configuration, keeping the original first.
func (e *Editor) writeMain(cfg *Config, st *state, main []byte) error {
	if cfg.Raw != nil {
		if _, err := os.Stat(e.backupPath()); errors.Is(err, fs.ErrNotExist) {
			if err := atomicfile.WriteFile(e.backupPath(), cfg.Raw, 0o600); err != nil {
				return err
			}
		}
	}
	// The record goes first, so that a crash after the write still knows
	// the file was changed and how to give it back.
	st.MainWritten = digestOf(main)
	if err := e.saveState(st); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(e.config), 0o755); err != nil {
		return err
	}
	return atomicfile.WriteFile(e.config, main, mode(e.config, 0o644))
}

func mode(path string, def fs.FileMode) fs.FileMode {
	if fi, err := os.Stat(path); err == nil {
		return fi.Mode().Perm()
	}
	return def
}

func (e *Editor) applyInPlace(cfg *Config, st *state, s Settings) (bool, error) {
	version := cfg.Version()
	plugin, err := criPlugin(version)
	if err != nil {
		return false, err
	}
	tree := deepCopy(cfg.tree).(map[string]any)
	if cfg.Empty() {
		tree["version"] = int64(version)
	}
	want := map[string]any{}
	for _, r := range s.Runtimes {
		want[r.Name] = runtimeTable(r)
	}
	base := []string{"plugins", plugin}
	set := func(path []string, v any) {
		if !slices.ContainsFunc(st.Added, func(c change) bool { return slices.Equal(c.Path, path) }) {
			c := change{Path: path}
			for i := len(path) - 1; i > 0 && lookup(tree, path[:i]...) == nil; i-- {
				c.Created++
			}
			if prev := lookup(tree, path...); prev != nil {
				b, _ := toml.Marshal(map[string]any{"v": prev})
				c.Existed, c.Previous = true, string(b)
			}
			st.Added = append(st.Added, c)
		}
		table(tree, path[:len(path)-1]...)[path[len(path)-1]] = v
	}
	// Entries set earlier but no longer wanted get back what they replaced.
	var keep []change
	for _, c := range st.Added {
		name := c.Path[len(c.Path)-1]
		isRuntime := len(c.Path) == 5 && c.Path[3] == "runtimes"
		unwanted := want[name] == nil && (!c.isDefaultRuntime() || len(want) == 0)
		if (isRuntime && unwanted) || (!isRuntime && s.CDISpecDirs == nil) {
			restore(tree, c)
			continue
		}
		keep = append(keep, c)
	}
	st.Added = keep
	runtimes := append(slices.Clone(base), "containerd", "runtimes")
	if len(want) > 0 {
		cri, _ := lookup(tree, base...).(map[string]any)
		if name, t := defaultRuntime(cri); t != nil && lookup(tree, append(slices.Clone(runtimes), name)...) == nil {
			set(append(slices.Clone(runtimes), name), t)
		}
	}
	for _, name := range sortedNames(want) {
		set(append(slices.Clone(runtimes), name), want[name])
	}
	if s.CDISpecDirs != nil {
		set(append(slices.Clone(base), "enable_cdi"), true)
		set(append(slices.Clone(base), "cdi_spec_dirs"), s.CDISpecDirs)
	}
	out, err := toml.Marshal(tree)
	if err != nil {
		return false, fmt.Errorf("write containerd config %q: %w", e.config, err)
	}
	st.Route = "in-place"
	if cfg.Raw != nil && equalTrees(out, cfg.Raw) {
		return false, e.saveState(st)
	}
	if err := e.writeMain(cfg, st, out); err != nil {
		return false, err
	}
	return true, nil
}

func (c change) isDefaultRuntime() bool {
	return c.Path[len(c.Path)-1] == "runc" && !c.Existed
}

func sortedNames(m map[string]any) []string {
	names := make([]string, 0, len(m))
	for k := range m {
		names = append(names, k)
	}
	slices.Sort(names)
	return names
}

// restore puts back what a key held before this package set it.
func restore(tree map[string]any, c change) {
	parent, ok := lookup(tree, c.Path[:len(c.Path)-1]...).(map[string]any)
	if !ok {
		return
	}
	var prev map[string]any
	if c.Existed && toml.Unmarshal([]byte(c.Previous), &prev) == nil {
		parent[c.Path[len(c.Path)-1]] = prev["v"]
		return
	}
	delete(parent, c.Path[len(c.Path)-1])
	for i := len(c.Path) - 1; i > len(c.Path)-1-c.Created; i-- {
		t, ok := lookup(tree, c.Path[:i]...).(map[string]any)
		if !ok || len(t) > 0 {
			return
		}
		delete(lookup(tree, c.Path[:i-1]...).(map[string]any), c.Path[i-1])
	}
}

// equalTrees reports whether two TOML documents hold the same settings.
func equalTrees(a, b []byte) bool {
	ta, erra := parse(a)
	tb, errb := parse(b)
	return erra == nil && errb == nil && reflect.DeepEqual(ta, tb)
}

// Revert removes every setting Apply made and gives back the original
// configuration. It reports whether a file changed.
func (e *Editor) Revert() (bool, error) {
	e.removeTemps()
	st, err := e.loadState()
	if err != nil || st == nil {
		return false, err
	}
	raw, err := os.ReadFile(e.config)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("read containerd config %q: %w", e.config, err)
	}
	changed := false
	switch st.Route {
	case "drop-in":
		// The import goes first: containerd refuses a configuration whose
		// imported file is missing, so the drop-in may only go after it.
		if err := e.restoreMain(st, raw, func() ([]byte, error) { return removeImport(raw, st.DropIn), nil }); err != nil {
			return false, err
		}
		changed = true
		if err := atomicfile.Remove(st.DropIn); err != nil {
			return changed, err
		}
	case "in-place":
		err := e.restoreMain(st, raw, func() ([]byte, error) {
			tree, err := parse(raw)
			if err != nil {
				return nil, fmt.Errorf("%w %q: %w", ErrInvalidConfig, e.config, err)
			}
			for i := len(st.Added) - 1; i >= 0; i-- {
				restore(tree, st.Added[i])
			}
			return toml.Marshal(tree)
		})
		if err != nil {
			return changed, err
		}
		changed = true
	}
	if err := atomicfile.Remove(e.statePath()); err != nil {
		return changed, err
	}
	return changed, atomicfile.Remove(e.backupPath())
}

// restoreMain gives back the original main configuration: the saved bytes
// when the file is still what this package wrote, or else the current file
// with this package's changes undone.
func (e *Editor) restoreMain(st *state, raw []byte, undo func() ([]byte, error)) error {
	if raw != nil && digestOf(raw) == st.MainWritten {
		if !st.MainExisted {
			return atomicfile.Remove(e.config)
		}
		orig, err := os.ReadFile(e.backupPath())
		if err == nil {
			return atomicfile.WriteFile(e.config, orig, mode(e.config, 0o644))
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	if raw == nil {
		return nil
	}
	out, err := undo()
	if err != nil {
		return err
	}
	if bytes.Equal(out, raw) {
		return nil
	}
	return atomicfile.WriteFile(e.config, out, mode(e.config, 0o644))
}
