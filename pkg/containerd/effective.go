package containerd

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// CRI plugin ids, by schema.
const (
	pluginCRIv1      = "cri"
	pluginGRPCCRI    = "io.containerd.grpc.v1.cri"
	pluginCRIRuntime = "io.containerd.cri.v1.runtime"
)

// Release is a containerd release line, as far as the rules for loading
// its configuration differ: 1.x replaces a plugin's table wholesale with
// each file that has it; 2.0 to 2.2 merge files and migrate the merged
// result once; 2.3 and later migrate each file before merging.
type Release struct {
	Major, Minor int
}

// Releases whose loading rules this package knows.
var (
	Release16 = Release{1, 6}
	Release17 = Release{1, 7}
	Release20 = Release{2, 0}
	Release22 = Release{2, 2}
	Release24 = Release{2, 4}
)

var releaseRE = regexp.MustCompile(`^v?(\d+)\.(\d+)`)

// ParseRelease reads "v1.7.35", "1.6.20~ds1" or "2.2.9" as a release line.
func ParseRelease(s string) (Release, error) {
	m := releaseRE.FindStringSubmatch(strings.TrimSpace(s))
	if m == nil {
		return Release{}, fmt.Errorf("containerd version %q: not major.minor", s)
	}
	major, _ := strconv.Atoi(m[1])
	minor, _ := strconv.Atoi(m[2])
	return Release{major, minor}, nil
}

func (r Release) String() string { return fmt.Sprintf("%d.%d", r.Major, r.Minor) }

// IsZero reports whether the release is unknown.
func (r Release) IsZero() bool { return r == Release{} }

// maxSchema is the highest configuration version the release loads.
func (r Release) maxSchema() int {
	switch {
	case r.Major < 2:
		return 2
	case r.Minor < 3:
		return 3
	}
	return 4
}

// runtimePlugin is the plugin whose table holds the CRI runtimes for the
// release, given the configuration's final schema version.
func (r Release) runtimePlugin(schema int) string {
	switch {
	case r.Major >= 2:
		return pluginCRIRuntime
	case schema <= 1:
		return pluginCRIv1
	}
	return pluginGRPCCRI
}

// ReleaseForSchema is the release assumed when the running containerd
// cannot be asked: schema 1 and 2 files are containerd 1.x's, 3 is what
// 2.0 to 2.2 write, and 4 what 2.3 and later write.
func ReleaseForSchema(schema int) Release {
	switch {
	case schema <= 2:
		return Release17
	case schema == 3:
		return Release20
	}
	return Release24
}

// Effective is containerd's reading of a configuration: the files it
// loads, in order, and the CRI runtime settings that result.
type Effective struct {
	Release Release
	// Files lists the files loaded, in containerd's order.
	Files []string
	// Dirs lists the directories where a file appearing, changing or going
	// changes what containerd loads: the main file's and every import's.
	Dirs []string
	// Schema is the configuration version after loading.
	Schema int
	// Plugin is the id of the table that holds runtimes, and CRI that table.
	Plugin string
	CRI    map[string]any
	// Owner names, per runtime, the last file whose table defined it.
	Owner map[string]string
	// Defined lists every runtime some loaded file defines under a CRI
	// plugin this release reads, with the file.
	Defined map[string]string
}

// Runtimes returns the effective runtimes, by name.
func (e *Effective) Runtimes() map[string]map[string]any {
	out := map[string]map[string]any{}
	rs, _ := lookup(e.CRI, "containerd", "runtimes").(map[string]any)
	for name, t := range rs {
		if m, ok := t.(map[string]any); ok {
			out[name] = m
		}
	}
	return out
}

// Files held in place of what is on disk: a path mapped to nil is absent.
type overlay map[string][]byte

func (o overlay) read(path string) ([]byte, error) {
	if b, ok := o[path]; ok {
		if b == nil {
			return nil, &fs.PathError{Op: "open", Path: path, Err: fs.ErrNotExist}
		}
		return b, nil
	}
	return os.ReadFile(path)
}

func (o overlay) glob(pattern string) []string {
	matches, _ := filepath.Glob(pattern)
	for p, b := range o {
		ok, _ := filepath.Match(pattern, p)
		switch {
		case ok && b != nil && !slices.Contains(matches, p):
			matches = append(matches, p)
		case ok && b == nil:
			matches = slices.DeleteFunc(matches, func(m string) bool { return m == p })
		}
	}
	slices.Sort(matches)
	return matches
}

// LoadEffective reads the configuration at main, with its imports, the way
// the release does: breadth first from the main file, each file's imports
// in order (globs sorted, paths relative to the importing path as given),
// a file loaded twice skipped; then merged and migrated by the release's
// rules. It fails, wrapping ErrInvalidConfig, where containerd would
// refuse to start: a file that is not TOML, a missing import, a schema
// version the release does not know.
func LoadEffective(main string, r Release) (*Effective, error) {
	return loadEffective(main, r, nil)
}

// loadedFile is one file containerd read, parsed.
type loadedFile struct {
	path string
	tree map[string]any
}

func loadEffective(main string, r Release, o overlay) (*Effective, error) {
	var files []loadedFile
	dirs := []string{filepath.Dir(main)}
	loaded := map[string]bool{}
	pending := []string{main}
	for len(pending) > 0 {
		p := pending[0]
		pending = pending[1:]
		if loaded[p] {
			continue
		}
		loaded[p] = true
		b, err := o.read(p)
		if errors.Is(err, fs.ErrNotExist) && p == main {
			b, err = nil, nil // containerd runs on its defaults
		}
		if err != nil {
			return nil, fmt.Errorf("%w: containerd %s would not start: %w", ErrInvalidConfig, r, err)
		}
		tree, err := parse(b)
		if err != nil {
			return nil, fmt.Errorf("%w: containerd %s would not start: %q: %w", ErrInvalidConfig, r, p, err)
		}
		files = append(files, loadedFile{p, tree})
		list, ok := tree["imports"].([]any)
		if tree["imports"] != nil && !ok {
			return nil, fmt.Errorf("%w: %q: imports is not an array", ErrInvalidConfig, p)
		}
		for _, v := range list {
			imp, ok := v.(string)
			if !ok {
				return nil, fmt.Errorf("%w: %q: imports holds %v, not a path", ErrInvalidConfig, p, v)
			}
			imp = filepath.Clean(imp)
			if !filepath.IsAbs(imp) {
				imp = filepath.Join(filepath.Dir(p), imp)
			}
			if d := filepath.Dir(imp); !slices.Contains(dirs, d) {
				dirs = append(dirs, d)
			}
			if strings.Contains(imp, "*") {
				pending = append(pending, o.glob(imp)...)
				continue
			}
			pending = append(pending, imp)
		}
	}

	e := &Effective{Release: r, Dirs: dirs, Owner: map[string]string{}, Defined: map[string]string{}}
	for _, f := range files {
		e.Files = append(e.Files, f.path)
		for _, id := range []string{pluginCRIv1, pluginGRPCCRI, pluginCRIRuntime} {
			if r.Major >= 2 && id == pluginCRIv1 || r.Major < 2 && id == pluginCRIRuntime {
				continue
			}
			rs, _ := lookup(f.tree, "plugins", id, "containerd", "runtimes").(map[string]any)
			for name := range rs {
				e.Defined[name] = f.path
			}
		}
	}
	var plugins map[string]any
	var err error
	if r.Major < 2 {
		plugins, e.Schema, err = merge1(files, e)
	} else {
		plugins, e.Schema, err = merge2(files, r, e)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: containerd %s would not start: %w", ErrInvalidConfig, r, err)
	}
	e.Plugin = r.runtimePlugin(e.Schema)
	if r.Major < 2 && e.Schema > 2 {
		e.Plugin = pluginCRIv1 // what 1.6 looks for in a file it does not understand
	}
	e.CRI, _ = plugins[e.Plugin].(map[string]any)
	return e, nil
}

func schemaOf(tree map[string]any) int {
	v, _ := tree["version"].(int64)
	return int(v)
}

// merge1 is containerd 1.x: each file that has a plugin's table replaces
// the table whole; the last non-zero version wins.
func merge1(files []loadedFile, e *Effective) (map[string]any, int, error) {
	plugins := map[string]any{}
	owner := map[string]string{}
	schema := 1
	for _, f := range files {
		if v := schemaOf(f.tree); v != 0 {
			schema = v
		}
		ps, _ := f.tree["plugins"].(map[string]any)
		for id, t := range ps {
			plugins[id] = deepCopy(t)
			owner[id] = f.path
		}
	}
	if schema > 2 {
		if e.Release.Minor < 7 {
			// 1.6 loads a file of a later version without a word and
			// finds none of its plugin tables.
			return plugins, schema, nil
		}
		return nil, 0, fmt.Errorf("unsupported config version `%d`, the max version is `2`", schema)
	}
	if schema >= 2 {
		for id := range plugins {
			if !strings.HasPrefix(id, "io.containerd.") || len(strings.Split(id, ".")) < 4 {
				return nil, 0, fmt.Errorf("invalid plugin key URI %q expect io.containerd.x.vx", id)
			}
		}
	}
	id := Release17.runtimePlugin(schema)
	rs, _ := lookup(plugins, id, "containerd", "runtimes").(map[string]any)
	for name := range rs {
		e.Owner[name] = owner[id]
	}
	return plugins, schema, nil
}

// merge2 is containerd 2.x: tables merge key by key, arrays are replaced.
// 2.0 to 2.2 rename the plugins of version 0 and 1 files and migrate the
// merged CRI settings once, when the merged version is below 3; 2.3 and
// later migrate every file up to the current version before merging it.
func merge2(files []loadedFile, r Release, e *Effective) (map[string]any, int, error) {
	maxSchema := r.maxSchema()
	out := map[string]any{}
	schema := maxSchema
	for _, f := range files {
		tree := deepCopy(f.tree).(map[string]any)
		v := schemaOf(tree)
		if v > maxSchema {
			return nil, 0, fmt.Errorf("%q: expected containerd config version equal to or less than `%d`, got `%d`", f.path, maxSchema, v)
		}
		ps, _ := tree["plugins"].(map[string]any)
		if ps == nil {
			ps = map[string]any{}
		}
		if r.Minor < 3 {
			if v <= 1 {
				ps = v1Migrate(ps)
				v = schema
			}
		} else {
			if v <= 1 {
				ps = v1Migrate(ps)
			}
			if v < 3 {
				migrateCRI(ps)
			}
			v = maxSchema
		}
		if v != 0 {
			schema = v
		}
		mergeTables(out, ps)
		for _, id := range []string{pluginGRPCCRI, pluginCRIRuntime} {
			rs, _ := lookup(ps, id, "containerd", "runtimes").(map[string]any)
			for name := range rs {
				e.Owner[name] = f.path
			}
		}
	}
	if r.Minor < 3 && schema < 3 {
		migrateCRI(out)
	}
	rs, _ := lookup(out, pluginCRIRuntime, "containerd", "runtimes").(map[string]any)
	for name := range maps.Clone(e.Owner) {
		if rs[name] == nil {
			delete(e.Owner, name)
		}
	}
	return out, schema, nil
}

// v1Migrate gives the short plugin ids of version 1 files their URIs.
func v1Migrate(ps map[string]any) map[string]any {
	out := make(map[string]any, len(ps))
	for id, t := range ps {
		if !strings.Contains(id, ".") {
			switch {
			case id == "cri":
				id = pluginGRPCCRI
			case strings.HasSuffix(id, "-service"):
				id = "io.containerd.service.v1." + id
			default:
				id = "io.containerd.grpc.v1." + id
			}
		}
		out[id] = t
	}
	return out
}

// migrateCRI copies the CRI runtime settings of io.containerd.grpc.v1.cri
// into io.containerd.cri.v1.runtime, each only where the destination does
// not have it: the runtimes map as a whole, only when the destination has
// none. Image and streaming settings move elsewhere and are left out.
func migrateCRI(ps map[string]any) {
	src, ok := ps[pluginGRPCCRI].(map[string]any)
	if !ok {
		return
	}
	dst, _ := ps[pluginCRIRuntime].(map[string]any)
	if dst == nil {
		dst = map[string]any{}
	}
	for k, v := range src {
		switch k {
		case "cni", "containerd", "sandbox_image", "registry", "image_decryption", "max_concurrent_downloads",
			"image_pull_progress_timeout", "image_pull_with_sync_fs", "stats_collect_period", "disable_tcp_service",
			"stream_server_address", "stream_server_port", "stream_idle_timeout", "enable_tls_streaming",
			"x509_key_pair_streaming":
			continue
		}
		if _, ok := dst[k]; !ok {
			dst[k] = deepCopy(v)
		}
	}
	if c, ok := src["containerd"].(map[string]any); ok {
		dc, _ := dst["containerd"].(map[string]any)
		if dc == nil {
			dc = map[string]any{}
		}
		for k, v := range c {
			switch k {
			case "snapshotter", "disable_snapshot_annotations", "discard_unpacked_layers":
				continue
			}
			if _, ok := dc[k]; !ok {
				dc[k] = deepCopy(v)
			}
		}
		dst["containerd"] = dc
	}
	ps[pluginCRIRuntime] = dst
}

// mergeTables merges from into to key by key; values that are not tables,
// arrays included, replace what was there.
func mergeTables(to, from map[string]any) {
	for k, v := range from {
		sub, isTable := v.(map[string]any)
		have, hasTable := to[k].(map[string]any)
		if isTable && hasTable {
			mergeTables(have, sub)
			continue
		}
		to[k] = deepCopy(v)
	}
}
