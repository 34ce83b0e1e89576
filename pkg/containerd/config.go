package containerd

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/pelletier/go-toml/v2"
)

// Defaults on a node.
const (
	DefaultConfigPath = "/etc/containerd/config.toml"
	// DefaultDropInPath is relative to the main configuration's directory,
	// as containerd resolves relative imports: it is right on the host
	// however that directory is mounted where the agent runs. It is kept
	// out of conf.d, whose glob imports would load it before files that
	// sort after it.
	DefaultDropInPath = "gpu-sandbox/runtimes.toml"
	DefaultSocket     = "/run/containerd/containerd.sock"
)

// Sentinel errors.
var (
	// ErrInvalidConfig means a containerd configuration is not TOML that
	// containerd would load; nothing was changed.
	ErrInvalidConfig = errors.New("invalid containerd configuration")
	// ErrNotEffective means containerd, loading the configuration by the
	// rules of its release, would not serve a runtime as written or would
	// lose one; nothing was changed.
	ErrNotEffective = errors.New("not in containerd's effective configuration")
	// ErrRuntimeExists means a runtime of the name to add is already defined
	// by someone else (an administrator, kata-deploy); it is not replaced.
	ErrRuntimeExists = errors.New("runtime already defined")
	// ErrNotReachable means no containerd process could be found behind its
	// socket: nothing serves it, or the agent cannot see the server's PID.
	ErrNotReachable = errors.New("containerd cannot be reached")
	// ErrNotAnswering means containerd did not answer on its socket in time.
	ErrNotAnswering = errors.New("containerd is not answering")
)

// Config is a containerd configuration file as read.
type Config struct {
	Path string
	// Raw holds the bytes read; nil when the file does not exist.
	Raw  []byte
	tree map[string]any
}

// Load reads and parses a containerd configuration. A missing file is an
// empty configuration, not an error.
func Load(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return &Config{Path: path, tree: map[string]any{}}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read containerd config %q: %w", path, err)
	}
	tree, err := parse(b)
	if err != nil {
		return nil, fmt.Errorf("%w %q: %w", ErrInvalidConfig, path, err)
	}
	return &Config{Path: path, Raw: b, tree: tree}, nil
}

func parse(b []byte) (map[string]any, error) {
	tree := map[string]any{}
	if err := toml.Unmarshal(b, &tree); err != nil {
		var de *toml.DecodeError
		if errors.As(err, &de) {
			row, col := de.Position()
			return nil, fmt.Errorf("line %d, column %d: %s", row, col, de.Error())
		}
		return nil, err
	}
	return tree, nil
}

// Empty reports whether the file is missing or holds no settings.
func (c *Config) Empty() bool { return len(c.tree) == 0 }

// Version is the configuration's schema version as containerd reads it:
// the "version" key, or 1 when a file with settings has none. A missing or
// empty file is given version 2, which is what this package writes into it.
func (c *Config) Version() int {
	switch v := c.tree["version"].(type) {
	case int64:
		return int(v)
	case nil:
		if c.Empty() {
			return 2
		}
		return 1
	}
	return 0
}

// CRIPlugin is the table that holds runtimes and CDI settings: "cri" in
// version 1 files, "io.containerd.grpc.v1.cri" in version 2 (containerd 1.x),
// "io.containerd.cri.v1.runtime" in version 3 and later (containerd 2.x).
func (c *Config) CRIPlugin() (string, error) {
	return criPlugin(c.Version())
}

func criPlugin(version int) (string, error) {
	switch version {
	case 1:
		return "cri", nil
	case 2:
		return "io.containerd.grpc.v1.cri", nil
	}
	if version >= 3 {
		return "io.containerd.cri.v1.runtime", nil
	}
	return "", fmt.Errorf("%w: version %d is not 1 or later", ErrInvalidConfig, version)
}

// Imports lists the files the configuration imports.
func (c *Config) Imports() []string {
	var out []string
	if list, ok := c.tree["imports"].([]any); ok {
		for _, v := range list {
			if s, ok := v.(string); ok {
				out = append(out, s)
			}
		}
	}
	return out
}

// Runtime returns a runtime's table, or nil.
func (c *Config) Runtime(name string) map[string]any {
	plugin, err := c.CRIPlugin()
	if err != nil {
		return nil
	}
	t, _ := lookup(c.tree, "plugins", plugin, "containerd", "runtimes", name).(map[string]any)
	return t
}

// lookup follows keys through nested tables.
func lookup(t map[string]any, keys ...string) any {
	var cur any = t
	for _, k := range keys {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		cur = m[k]
	}
	return cur
}

// table returns the table at keys, creating empty ones on the way.
func table(t map[string]any, keys ...string) map[string]any {
	for _, k := range keys {
		next, ok := t[k].(map[string]any)
		if !ok {
			next = map[string]any{}
			t[k] = next
		}
		t = next
	}
	return t
}

// deepCopy copies a parsed TOML value.
func deepCopy(v any) any {
	switch v := v.(type) {
	case map[string]any:
		m := make(map[string]any, len(v))
		for k, x := range v {
			m[k] = deepCopy(x)
		}
		return m
	case []any:
		s := make([]any, len(v))
		for i, x := range v {
			s[i] = deepCopy(x)
		}
		return s
	}
	return v
}
