package containerd_test

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/pelletier/go-toml/v2"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/containerd"
)

// Whatever containerd configuration an administrator has, adding the Kata
// runtime and reverting gives it back: byte for byte on the drop-in route,
// with the same settings in place.
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
		if v, ok := tree["version"]; ok && v != int64(1) && v != int64(2) && v != int64(3) {
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
			return
		}
		os.WriteFile(cfg, mustRead(t, cfg), 0o644) // someone else rewrote it: the byte-exact path is not taken
		if _, err := e.Revert(); err != nil {
			t.Fatal(err)
		}
		var got map[string]any
		if err := toml.Unmarshal(mustRead(t, cfg), &got); err != nil {
			t.Fatal(err)
		}
		if len(tree) == 0 {
			delete(got, "version") // an empty file was given a version
		}
		if !reflect.DeepEqual(got, tree) && !(len(got) == 0 && len(tree) == 0) {
			t.Fatalf("in-place route: after revert\n%v\nwant\n%v", got, tree)
		}
	})
}

func mustRead(t *testing.T, path string) []byte {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return append(b, '\n')
}
