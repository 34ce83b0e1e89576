package containerd

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
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
	// Release is the containerd that loads the configuration, whose rules
	// decide where entries go and what the effective result is. Zero:
	// guessed from the main file's schema (ReleaseForSchema).
	Release Release
	// Replace takes over runtimes of the same names that someone else
	// defined (kata-deploy): ours are placed to win. On containerd 2.x,
	// which merges tables, keys of theirs that ours does not set stay.
	// Default false: such a runtime is ErrRuntimeExists.
	Replace bool
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
	// importEntry is how the main configuration names the drop-in.
	importEntry string
}

// NewEditor edits the configuration at configPath through the drop-in file
// dropInPath, or in place when dropInPath is "". A relative dropInPath is
// relative to the directory of configPath, and the import is written so:
// containerd resolves it the same way, so the entry is right on the host
// however the directory is mounted where the Editor runs.
func NewEditor(configPath, dropInPath string) *Editor {
	e := &Editor{config: configPath, dropIn: dropInPath, importEntry: dropInPath}
	if dropInPath != "" && !filepath.IsAbs(dropInPath) {
		e.dropIn = filepath.Join(filepath.Dir(configPath), dropInPath)
	}
	return e
}

// state is what the Editor changed, kept beside the configuration.
type state struct {
	Route  string `json:"route"`            // "drop-in" or "in-place"
	DropIn string `json:"dropIn,omitempty"` // the drop-in the main file imports
	Import string `json:"import,omitempty"` // the imports entry naming it
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

// ours lists the imports entries this package added, as written.
func (e *Editor) ours(st *state) []string {
	var out []string
	for _, p := range []string{e.importEntry, e.dropIn, st.Import, st.DropIn} {
		if p != "" && !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out
}

// Apply makes the configuration hold exactly these settings: entries of
// earlier Applies that are no longer wanted go. It reports whether a file
// changed, which means containerd must be restarted to see it.
//
// The contract is containerd's effective configuration, computed by the
// rules of the release (see LoadEffective), not the files: Apply writes
// nothing unless, with its entries, containerd would load the
// configuration, serve every runtime and setting it served before
// unchanged, and serve ours as written. Where the entries go is chosen to
// make that so: the table the administrator's runtimes live in, and, for
// containerd 1.x, which replaces a plugin's table with each file that has
// it, a drop-in loaded after the others that carries their effective table.
// A runtime of the same name defined elsewhere (ErrRuntimeExists), a
// configuration containerd would not load, or one that already loses a
// runtime before we touch it, is reported and nothing is changed.
func (e *Editor) Apply(s Settings) (bool, error) {
	e.removeTemps()
	if _, err := e.target(); err != nil {
		return false, err
	}
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
	release := s.Release
	if release.IsZero() {
		release = ReleaseForSchema(admin.Version())
	}

	// containerd's reading of the administrator's configuration, without us.
	without := overlay{e.config: base}
	for _, p := range []string{e.dropIn, st.DropIn} {
		if p != "" {
			without[p] = nil
		}
	}
	before, err := loadEffective(e.config, release, without)
	if err != nil {
		return false, fmt.Errorf("containerd's configuration as it is: %w", err)
	}
	if release.Major < 2 && before.Schema > 2 {
		return false, fmt.Errorf("%w: containerd %s does not read a version %d configuration (%q): it runs on its defaults",
			ErrInvalidConfig, release, before.Schema, e.config)
	}
	if err := alreadyLost(before); err != nil {
		return false, err
	}
	for _, r := range s.Runtimes {
		if f, ok := before.Defined[r.Name]; ok && !s.Replace {
			return false, fmt.Errorf("%w: runtime %q is already defined in %q, not by gpu-sandbox: remove it there or give the runtime class another name",
				ErrRuntimeExists, r.Name, f)
		}
	}

	var tried []error
	for _, c := range e.candidates(base, admin, before, release, s) {
		if c.err != nil {
			tried = append(tried, c.err)
			continue
		}
		with := maps.Clone(without)
		with[e.config] = c.main
		if e.dropIn != "" {
			with[e.dropIn] = c.dropIn
		}
		after, err := loadEffective(e.config, release, with)
		if err == nil {
			err = verify(before, after, s)
		}
		if err != nil {
			tried = append(tried, fmt.Errorf("%s: %w", c.name, err))
			continue
		}
		return e.write(cfg, st, base, c)
	}
	return false, fmt.Errorf("%w: no way to add the runtimes to %q that containerd %s would read as written: %w",
		ErrNotEffective, e.config, release, errors.Join(tried...))
}

// candidate is one way of placing the entries.
type candidate struct {
	name         string
	main, dropIn []byte
	route        string
	err          error
}

// candidates lists the placements worth trying, the likeliest first.
func (e *Editor) candidates(base []byte, admin *Config, before *Effective, r Release, s Settings) []candidate {
	var out []candidate
	if e.dropIn == "" {
		for _, plugin := range e.plugins(admin, before, r) {
			c := candidate{name: "in place under " + plugin, route: "in-place"}
			if c.main, c.err = addInPlace(base, r, plugin, s); c.err != nil {
				c.err = fmt.Errorf("edit containerd config %q: %w", e.config, c.err)
			}
			out = append(out, c)
		}
		return out
	}
	main, err := addImport(base, e.importEntry)
	if err != nil {
		return []candidate{{err: fmt.Errorf("edit containerd config %q: %w", e.config, err)}}
	}
	type variant struct {
		schema int // 0: no version line
		plugin string
	}
	var variants []variant
	if r.Major < 2 {
		schema := before.Schema
		if admin.Empty() {
			schema = admin.Version() // the version addImport gives the file
		}
		variants = []variant{{schema, r.runtimePlugin(schema)}}
	} else {
		for _, plugin := range e.plugins(admin, before, r) {
			schema := admin.Version()
			if plugin == pluginGRPCCRI {
				schema = 2
			}
			variants = append(variants, variant{schema, plugin})
		}
		variants = append(variants, variant{r.maxSchema(), pluginCRIRuntime}, variant{0, pluginCRIRuntime}, variant{2, pluginGRPCCRI})
	}
	var seen []variant
	for _, v := range variants {
		if slices.Contains(seen, v) {
			continue
		}
		seen = append(seen, v)
		c := candidate{name: fmt.Sprintf("drop-in under %s, version %d", v.plugin, v.schema), route: "drop-in", main: main}
		if c.dropIn, c.err = dropInBody(before, r, v.schema, v.plugin, s, e.config); c.err != nil {
			c.err = fmt.Errorf("write containerd drop-in %q: %w", e.dropIn, c.err)
		}
		out = append(out, c)
	}
	return out
}

// plugins lists the CRI plugin tables to put runtimes in: the one the
// administrator's runtimes already live in first (AKS writes version 2
// files with io.containerd.cri.v1.runtime), then the one the schema says.
func (e *Editor) plugins(admin *Config, before *Effective, r Release) []string {
	var out []string
	add := func(p string) {
		if p != "" && !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	for _, p := range []string{pluginCRIRuntime, pluginGRPCCRI, pluginCRIv1} {
		if r.Major < 2 && p == pluginCRIRuntime {
			continue
		}
		if lookup(admin.tree, "plugins", p, "containerd", "runtimes") != nil {
			add(p)
		}
	}
	if plugin, err := criPlugin(admin.Version()); err == nil {
		add(plugin)
	}
	if r.Major >= 2 {
		add(pluginCRIRuntime)
	}
	return out
}

// alreadyLost reports runtimes that a file defines and containerd's reading
// of the configuration, before any change of ours, does not have.
func alreadyLost(before *Effective) error {
	have := before.Runtimes()
	var errs []error
	for _, name := range slices.Sorted(maps.Keys(before.Defined)) {
		if have[name] == nil {
			errs = append(errs, fmt.Errorf("runtime %q of %q", name, before.Defined[name]))
		}
	}
	if len(errs) == 0 {
		return nil
	}
	return fmt.Errorf("%w: containerd %s already loses, before any change: %w; fix the configuration first (with containerd 1.x, the last file with the CRI plugin's table replaces the others')",
		ErrNotEffective, before.Release, errors.Join(errs...))
}

// verify holds the contract: every runtime and setting containerd served
// before is served unchanged, ours as written, CDI as asked.
func verify(before, after *Effective, s Settings) error {
	had, has := before.Runtimes(), after.Runtimes()
	var errs []error
	for _, name := range slices.Sorted(maps.Keys(had)) {
		if s.Replace && slices.ContainsFunc(s.Runtimes, func(r Runtime) bool { return r.Name == name }) {
			continue // taken over
		}
		if !sameValue(has[name], had[name]) {
			errs = append(errs, fmt.Errorf("runtime %q would be lost or changed", name))
		}
	}
	for _, r := range s.Runtimes {
		got := has[r.Name]
		if got == nil {
			errs = append(errs, fmt.Errorf("runtime %q would not be served (the CRI table containerd reads comes from %q)", r.Name, lastFile(after)))
			continue
		}
		if got["runtime_type"] != r.Type || lookup(got, "options", "ConfigPath") != r.ConfigPath {
			errs = append(errs, fmt.Errorf("runtime %q would be %q's, not ours", r.Name, after.Owner[r.Name]))
		}
	}
	for k, v := range before.CRI {
		if k == "containerd" || k == "enable_cdi" || k == "cdi_spec_dirs" {
			continue
		}
		if !sameValue(after.CRI[k], v) {
			errs = append(errs, fmt.Errorf("setting %s would change", k))
		}
	}
	for k, v := range lookupTable(before.CRI, "containerd") {
		if k != "runtimes" && !sameValue(lookup(after.CRI, "containerd", k), v) {
			errs = append(errs, fmt.Errorf("setting containerd.%s would change", k))
		}
	}
	if s.CDISpecDirs != nil && (after.CRI["enable_cdi"] != true || !sameValue(after.CRI["cdi_spec_dirs"], s.CDISpecDirs)) {
		errs = append(errs, errors.New("CDI would not be enabled"))
	}
	return errors.Join(errs...)
}

func lookupTable(t map[string]any, keys ...string) map[string]any {
	m, _ := lookup(t, keys...).(map[string]any)
	return m
}

func lastFile(e *Effective) string {
	if len(e.Files) == 0 {
		return ""
	}
	return e.Files[len(e.Files)-1]
}

// write puts the chosen placement on disk: the drop-in before the main file
// that imports it, since an import of a missing file stops containerd.
func (e *Editor) write(cfg *Config, st *state, base []byte, c candidate) (bool, error) {
	changed := false
	st.Route = c.route
	if c.route == "drop-in" {
		if err := os.MkdirAll(filepath.Dir(e.dropIn), 0o755); err != nil {
			return false, fmt.Errorf("write containerd drop-in: %w", err)
		}
		var err error
		if changed, err = atomicfile.WriteFileIfChanged(e.dropIn, c.dropIn, 0o644); err != nil {
			return false, err
		}
		if changed {
			st.Changed = now()
		}
	}
	if cfg.Raw == nil || !bytes.Equal(c.main, cfg.Raw) {
		if err := e.writeMain(cfg, st, base, c.main); err != nil {
			return changed, err
		}
		changed = true
	}
	if old := st.DropIn; old != "" && old != e.dropIn {
		// The route or the path changed: the old drop-in is no longer imported.
		if err := atomicfile.Remove(old); err != nil {
			return changed, err
		}
	}
	st.DropIn, st.Import = e.dropIn, e.importEntry
	return changed, e.saveState(st)
}

// dropInBody is the drop-in's content: the settings under the plugin's
// table, with the schema version given (none for 0). containerd 1.x
// replaces a plugin's table wholesale with each file that has it, so there
// the drop-in carries the effective table of everything loaded before it;
// containerd 2.x merges tables, and the drop-in holds only our entries.
func dropInBody(before *Effective, r Release, schema int, plugin string, s Settings, mainPath string) ([]byte, error) {
	cri := map[string]any{}
	if r.Major < 2 {
		if t, ok := deepCopy(before.CRI).(map[string]any); ok && t != nil {
			cri = t
		}
	}
	runtimes := table(cri, "containerd", "runtimes")
	if r.Major < 2 && len(before.Runtimes()) == 0 && len(s.Runtimes) > 0 {
		if name, t := defaultRuntime(before.CRI, r); t != nil && runtimes[name] == nil {
			runtimes[name] = t
		}
	}
	for _, rt := range s.Runtimes {
		runtimes[rt.Name] = runtimeTable(rt)
	}
	if len(runtimes) == 0 {
		delete(table(cri, "containerd"), "runtimes")
		if len(table(cri, "containerd")) == 0 {
			delete(cri, "containerd")
		}
	}
	if s.CDISpecDirs != nil {
		cri["enable_cdi"] = true
		cri["cdi_spec_dirs"] = s.CDISpecDirs
	}
	doc := map[string]any{"plugins": map[string]any{plugin: cri}}
	if schema != 0 {
		doc["version"] = schema
	}
	body, err := toml.Marshal(doc)
	if err != nil {
		return nil, err
	}
	return append([]byte("# Written by gpu-sandbox kata-manager; kata-manager uninstall removes it.\n"+
		"# It is regenerated from "+mainPath+" and its imports on every reconcile: edit those instead.\n"), body...), nil
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
	target, err := e.target()
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(target, main, mode(target, 0o644))
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
// On containerd 1.x, setting any runtime replaces the built-in runtimes
// map, so the built-in runc must then be spelled out, as the release
// defines it, or pods without a RuntimeClass stop starting (2.x merges it).
func defaultRuntime(cri map[string]any, r Release) (string, map[string]any) {
	name, _ := lookup(cri, "containerd", "default_runtime_name").(string)
	if name == "" {
		name = "runc"
	}
	if name != "runc" || r.Major >= 2 {
		return name, nil // only the built-in one is known, and only 1.x drops it
	}
	t := map[string]any{"runtime_type": "io.containerd.runc.v2"}
	if r.Minor >= 7 {
		t["sandbox_mode"] = "podsandbox"
	}
	return name, t
}

// target is the file the main configuration's bytes live in: the link's
// target when it is a symbolic link, which stays a link.
func (e *Editor) target() (string, error) {
	fi, err := os.Lstat(e.config)
	if err != nil || fi.Mode()&os.ModeSymlink == 0 {
		return e.config, nil
	}
	t, err := filepath.EvalSymlinks(e.config)
	if err != nil {
		return "", fmt.Errorf("%w: %q is a symbolic link to nothing: %w", ErrInvalidConfig, e.config, err)
	}
	return t, nil
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
			target, err := e.target()
			if err != nil {
				return false, err
			}
			if err := atomicfile.WriteFile(target, base, mode(target, 0o644)); err != nil {
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
