package containerd_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/pelletier/go-toml/v2"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/containerd"
)

// Whatever containerd configuration an administrator has, adding the Kata
// runtime and reverting gives it back byte for byte, on both routes.
func FuzzApplyRevert(f *testing.F) {
	f.Add([]byte(userV2))
	f.Add([]byte("version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd]\n  default_runtime_name = 'crun'\n"))
	f.Add([]byte("imports = [\"/a.toml\", # c\n ]\nroot = \"/r\"\n"))
	f.Add([]byte("# only a comment\n"))
	f.Add([]byte(""))
	f.Add([]byte("version = 1\n[plugins.cri.containerd.runtimes.kata-qemu-nvidia-gpu]\n  runtime_type = \"theirs\"\n"))
	f.Fuzz(func(t *testing.T, main []byte) {
		var tree map[string]any
		if toml.Unmarshal(main, &tree) != nil {
			return
		}
		if v, ok := tree["version"].(int64); ok && v < 1 {
			return
		}
		dir := t.TempDir()
		cfg := filepath.Join(dir, "config.toml")
		os.WriteFile(cfg, main, 0o644)
		e := containerd.NewEditor(cfg, filepath.Join(dir, "conf.d", "99.toml"))
		if _, err := e.Apply(containerd.Settings{Runtimes: []containerd.Runtime{kata}, CDISpecDirs: []string{"/var/run/cdi"}}); err != nil {
			return // an imports key that is not a list of strings, say: refused, and nothing changed
		}
		if _, err := e.Revert(); err != nil {
			t.Fatal(err)
		}
		if got, _ := os.ReadFile(cfg); string(got) != string(main) {
			t.Fatalf("drop-in route: after revert\n%q\nwant\n%q", got, main)
		}

		e = containerd.NewEditor(cfg, "")
		if _, err := e.Apply(containerd.Settings{Runtimes: []containerd.Runtime{kata}, CDISpecDirs: []string{"/var/run/cdi"}}); err != nil {
			return // a layout where text added at the end would not load, say: refused, and nothing changed
		}
		if _, err := e.Revert(); err != nil {
			t.Fatal(err)
		}
		if got, _ := os.ReadFile(cfg); string(got) != string(main) {
			t.Fatalf("in-place route: after revert\n%q\nwant\n%q", got, main)
		}
	})
}
