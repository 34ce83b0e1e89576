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
// The main configuration is the administrator's: it is edited as text, each
// added line marked (see text.go), so that Revert takes out exactly what was
// added from the file as it is then, keeping every byte the administrator
// wrote since, even next to our lines. Every write is atomic. Before each
// write of the main configuration, the administrator's version of it (the
// file without our entries) is kept in <config>.gpu-sandbox.bak, for them:
// nothing restores it. What was done is recorded in <config>.gpu-sandbox.json.
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
	Route  string `json:"route"`            // "drop-in" or "in-place"
	DropIn string `json:"dropIn,omitempty"` // the drop-in the main file imports
	// Created is set while the main configuration is a file this package
	// created and nobody else has written since: Revert removes it.
	Created bool `json:"created,omitempty"`
	// MainWritten is the SHA-256 of the main configuration as last written.
	MainWritten string `json:"mainWritten"`
	// Changed is when a file was last changed, on the boot clock.
	Changed *Stamp `json:"changed,omitempty"`
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
	_, err = atomicfile.WriteFileIfChanged(e.statePath(), append(b, '\n'), 0o600)
	return err
}

// LastChange reports when this package last changed a file of containerd's
// configuration (Apply or Revert), and false when it never did: a
// containerd that started before it runs without the change.
func (e *Editor) LastChange() (Stamp, bool) {
	st, err := e.loadState()
	if err != nil || st == nil || st.Changed == nil {
		return Stamp{}, false
	}
	return *st.Changed, true
}

func digestOf(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// ours lists the drop-ins whose imports entries this package added.
func (e *Editor) ours(st *state) []string {
	var out []string
	for _, p := range []string{e.dropIn, st.DropIn} {
		if p != "" && !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out
}

// Apply makes the configuration hold exactly these settings: entries of
// earlier Applies that are no longer wanted go. It reports whether a file
// changed, which means containerd must be restarted to see it. A runtime
// of the same name that someone else defined in the main configuration is
// not replaced (ErrRuntimeExists).
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
		st = &state{}
	}
	if cfg.Raw != nil && digestOf(cfg.Raw) != st.MainWritten {
		st.Created = false // someone else wrote the file since: it is theirs
	}
	base, err := strip(cfg.Raw, e.ours(st))
	if err != nil {
		return false, fmt.Errorf("%w %q: %w", ErrInvalidConfig, e.config, err)
	}
	baseTree, err := parse(base)
	if err != nil {
		return false, fmt.Errorf("%w %q: %w", ErrInvalidConfig, e.config, err)
	}
	admin := &Config{Path: e.config, Raw: base, tree: baseTree}
	version := admin.Version()
	plugin, err := criPlugin(version)
	if err != nil {
		return false, err
	}
	for _, r := range s.Runtimes {
		if admin.Runtime(r.Name) != nil {
			return false, fmt.Errorf("%w: runtime %q is already defined in %q, not by gpu-sandbox: remove it or give the runtime class another name",
				ErrRuntimeExists, r.Name, e.config)
		}
	}

	changed := false
	var main []byte
	if e.dropIn == "" {
		st.Route = "in-place"
		if main, err = addInPlace(base, plugin, s); err != nil {
			return false, fmt.Errorf("edit containerd config %q: %w", e.config, err)
		}
	} else {
		st.Route = "drop-in"
		body, err := dropInBody(admin, version, plugin, s, e.config)
		if err != nil {
			return false, fmt.Errorf("write containerd drop-in %q: %w", e.dropIn, err)
		}
		if main, err = addImport(base, e.dropIn); err != nil {
			return false, fmt.Errorf("edit containerd config %q: %w", e.config, err)
		}
		if err := os.MkdirAll(filepath.Dir(e.dropIn), 0o755); err != nil {
			return false, fmt.Errorf("write containerd drop-in: %w", err)
		}
		// The drop-in first: an import of a missing file would stop containerd.
		if changed, err = atomicfile.WriteFileIfChanged(e.dropIn, body, 0o644); err != nil {
			return false, err
		}
		if changed {
			st.Changed = now()
		}
	}
	if cfg.Raw == nil || !bytes.Equal(main, cfg.Raw) {
		if err := e.writeMain(cfg, st, base, main); err != nil {
			return changed, err
		}
		changed = true
	}
	if old := st.DropIn; old != "" && old != e.dropIn {
		// The route changed: the old drop-in is no longer imported.
		if err := atomicfile.Remove(old); err != nil {
			return changed, err
		}
	}
	st.DropIn = e.dropIn
	return changed, e.saveState(st)
}

// dropInBody is the drop-in's content: the settings under the CRI plugin's
// table. containerd 1.x replaces a plugin's table wholesale with an imported
// one, so for schema 1 and 2 it carries a copy of the main file's table;
// containerd 2.x merges imported tables into the main ones.
func dropInBody(admin *Config, version int, plugin string, s Settings, mainPath string) ([]byte, error) {
	var cri map[string]any
	if version >= 3 {
		cri = map[string]any{}
	} else {
		cri, _ = deepCopy(lookup(admin.tree, "plugins", plugin)).(map[string]any)
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
		return nil, err
	}
	return append([]byte("# Written by gpu-sandbox kata-manager; kata-manager uninstall removes it.\n"+
		"# It is regenerated from "+mainPath+" on every reconcile: edit that file instead.\n"), body...), nil
}

// writeMain replaces the main configuration, keeping the administrator's
// version of it (without our entries) beside it first.
func (e *Editor) writeMain(cfg *Config, st *state, base, main []byte) error {
	if cfg.Raw == nil {
		st.Created = true
	} else if old, err := os.ReadFile(e.backupPath()); err != nil || !bytes.Equal(old, base) {
		if err := atomicfile.WriteFile(e.backupPath(), base, 0o600); err != nil {
			return err
		}
	}
	// The record goes first, so that a crash after the write still knows
	// the file was changed.
	st.MainWritten = digestOf(main)
	st.Changed = now()
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

// Revert takes out every entry Apply added, from the configuration as it
// is now: lines the administrator added or changed since stay as they are.
// A main configuration this package created, and nobody changed since, is
// removed. It reports whether a file changed.
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
	var final []byte
	switch {
	case raw == nil:
	case st.Created && digestOf(raw) == st.MainWritten:
		if err := atomicfile.Remove(e.config); err != nil {
			return false, err
		}
		changed = true
	default:
		// The import goes first: containerd refuses a configuration whose
		// imported file is missing, so the drop-in may only go after it.
		base, err := strip(raw, e.ours(st))
		if err != nil {
			return false, fmt.Errorf("%w %q: %w", ErrInvalidConfig, e.config, err)
		}
		if !bytes.Equal(base, raw) {
			if err := atomicfile.WriteFile(e.config, base, mode(e.config, 0o644)); err != nil {
				return false, err
			}
			changed = true
		}
		final = base
	}
	if st.DropIn != "" {
		if _, err := os.Stat(st.DropIn); err == nil {
			changed = true
		}
		if err := atomicfile.Remove(st.DropIn); err != nil {
			return changed, err
		}
	}
	if err := atomicfile.Remove(e.statePath()); err != nil {
		return changed, err
	}
	// The backup stays while it holds something the file does not.
	if b, err := os.ReadFile(e.backupPath()); err == nil && (final == nil || bytes.Equal(b, final)) {
		return changed, atomicfile.Remove(e.backupPath())
	}
	return changed, nil
}
