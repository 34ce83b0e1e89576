package containerd_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/containerd"
)

const userV2 = `# Managed by the node image. Keep the comments.
version = 2
root = "/var/lib/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"  # the default

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = true
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]
      runtime_type = "io.containerd.runc.v2"
`

var kata = containerd.Runtime{
	Name: "kata-qemu-nvidia-gpu", Type: "io.containerd.kata-qemu-nvidia-gpu.v2",
	ConfigPath:     "/opt/nvidia-gpu-operator/artifacts/runtimeclasses/kata-qemu-nvidia-gpu/configuration.toml",
	PodAnnotations: []string{"io.katacontainers.*", "cdi.k8s.io/*"}, ContainerAnnotations: []string{"io.katacontainers.*"},
}

var snp = containerd.Runtime{Name: "kata-qemu-nvidia-gpu-snp", Type: "io.containerd.kata-qemu-nvidia-gpu-snp.v2",
	ConfigPath: "/opt/snp/configuration.toml", PodAnnotations: []string{"io.katacontainers.*"}}

func files(t *testing.T, main string) (cfg, dropIn string) {
	dir := t.TempDir()
	cfg = filepath.Join(dir, "config.toml")
	if main != "\x00missing" {
		if err := os.WriteFile(cfg, []byte(main), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	return cfg, filepath.Join(dir, "conf.d", "99-gpu-sandbox.toml")
}

func tree(t *testing.T, path string) map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]any{}
	if err := toml.Unmarshal(b, &m); err != nil {
		t.Fatalf("%s is not valid TOML: %v\n%s", path, err, b)
	}
	return m
}

func get(m map[string]any, keys ...string) any {
	var cur any = m
	for _, k := range keys {
		mm, ok := cur.(map[string]any)
		if !ok {
			return nil
		}
		cur = mm[k]
	}
	return cur
}

// leftovers checks what a Revert that gave back the administrator's file
// byte for byte leaves: neither the record nor a backup identical to it.
func leftovers(t *testing.T, cfg string) {
	t.Helper()
	for _, suffix := range []string{".gpu-sandbox.json", ".gpu-sandbox.bak"} {
		if _, err := os.Stat(cfg + suffix); err == nil {
			t.Errorf("%s left after Revert", filepath.Base(cfg+suffix))
		}
	}
}

func TestDropInVersion2(t *testing.T) {
	cfg, dropIn := files(t, userV2)
	e := containerd.NewEditor(cfg, dropIn)
	changed, err := e.Apply(containerd.Settings{Runtimes: []containerd.Runtime{kata}, CDISpecDirs: []string{"/etc/cdi", "/var/run/cdi"}})
	if err != nil || !changed {
		t.Fatalf("Apply: %v, %v", changed, err)
	}
	main, _ := os.ReadFile(cfg)
	if want := strings.Replace(userV2, "version = 2\n", "version = 2\nimports = [\""+dropIn+"\"]  # gpu-sandbox\n", 1); string(main) != want {
		t.Errorf("main config:\n%s\nwant only the imports line added:\n%s", main, want)
	}
	d := tree(t, dropIn)
	cri := []string{"plugins", "io.containerd.grpc.v1.cri"}
	// containerd 1.x replaces the CRI table with the imported one: it must
	// carry the administrator's settings too.
	for path, want := range map[string]any{
		"sandbox_image": "registry.k8s.io/pause:3.9",
		"containerd.runtimes.runc.options.SystemdCgroup":                           true,
		"containerd.runtimes.nvidia.runtime_type":                                  "io.containerd.runc.v2",
		"containerd.runtimes.kata-qemu-nvidia-gpu.runtime_type":                    kata.Type,
		"containerd.runtimes.kata-qemu-nvidia-gpu.options.ConfigPath":              kata.ConfigPath,
		"containerd.runtimes.kata-qemu-nvidia-gpu.privileged_without_host_devices": true,
		"enable_cdi": true,
	} {
		if got := get(d, append(cri, strings.Split(path, ".")...)...); !reflect.DeepEqual(got, want) {
			t.Errorf("drop-in %s = %v, want %v", path, got, want)
		}
	}
	if v := get(d, "version"); v != int64(2) {
		t.Errorf("drop-in version %v", v)
	}
	if changed, err := e.Apply(containerd.Settings{Runtimes: []containerd.Runtime{kata}, CDISpecDirs: []string{"/etc/cdi", "/var/run/cdi"}}); changed || err != nil {
		t.Errorf("second Apply: %v, %v; want no change", changed, err)
	}
	if changed, err := e.Revert(); !changed || err != nil {
		t.Fatalf("Revert: %v %v", changed, err)
	}
	if main, _ := os.ReadFile(cfg); string(main) != userV2 {
		t.Errorf("after Revert:\n%s\nwant the original byte for byte", main)
	}
	if fi, _ := os.Stat(cfg); fi.Mode().Perm() != 0o640 {
		t.Errorf("mode %v, want the original 0640", fi.Mode().Perm())
	}
	if _, err := os.Stat(dropIn); !os.IsNotExist(err) {
		t.Error("drop-in left after Revert")
	}
	leftovers(t, cfg)
}

func TestDropInVersions(t *testing.T) {
	for _, tc := range []struct {
		name, main string
		plugin     string
		version    int64
		runc       bool // the built-in runc is spelled out
	}{
		{"version 1 (no version key)", "root = \"/var/lib/containerd\"\n[plugins.cri]\n  sandbox_image = \"pause\"\n", "cri", 1, true},
		{"version 3", "version = 3\n[plugins.'io.containerd.cri.v1.images']\n  snapshotter = \"overlayfs\"\n", "io.containerd.cri.v1.runtime", 3, false},
		{"empty", "", "io.containerd.grpc.v1.cri", 2, true},
		{"comments only", "# nothing here\n", "io.containerd.grpc.v1.cri", 2, true},
		{"missing", "\x00missing", "io.containerd.grpc.v1.cri", 2, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, dropIn := files(t, tc.main)
			e := containerd.NewEditor(cfg, dropIn)
			if _, err := e.Apply(containerd.Settings{Runtimes: []containerd.Runtime{kata}}); err != nil {
				t.Fatal(err)
			}
			d := tree(t, dropIn)
			if v := get(d, "version"); v != tc.version {
				t.Errorf("drop-in version %v, want %d", v, tc.version)
			}
			runtimes, _ := get(d, "plugins", tc.plugin, "containerd", "runtimes").(map[string]any)
			if runtimes[kata.Name] == nil {
				t.Fatalf("drop-in lacks the runtime under %s:\n%v", tc.plugin, d)
			}
			if (runtimes["runc"] != nil) != tc.runc {
				t.Errorf("runc in drop-in: %v, want %v", runtimes["runc"] != nil, tc.runc)
			}
			m := tree(t, cfg)
			if imports, _ := m["imports"].([]any); len(imports) != 1 || imports[0] != dropIn {
				t.Errorf("main imports %v", m["imports"])
			}
			if _, err := e.Revert(); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(cfg)
			if tc.main == "\x00missing" {
				if !os.IsNotExist(err) {
					t.Errorf("a main config was left behind: %q", got)
				}
			} else if string(got) != tc.main {
				t.Errorf("after Revert %q, want %q", got, tc.main)
			}
			leftovers(t, cfg)
		})
	}
}

func TestImportsAlreadyThereOrMultiline(t *testing.T) {
	glob := "version = 2\nimports = [\"CONF/*.toml\"]\n"
	cfg, dropIn := files(t, "")
	glob = strings.ReplaceAll(glob, "CONF", filepath.Dir(dropIn))
	os.WriteFile(cfg, []byte(glob), 0o644)
	e := containerd.NewEditor(cfg, dropIn)
	if _, err := e.Apply(containerd.Settings{Runtimes: []containerd.Runtime{kata}}); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(cfg); string(got) != glob {
		t.Errorf("a glob that covers the drop-in was extended:\n%s", got)
	}

	a, b := filepath.Join(filepath.Dir(cfg), "a.toml"), filepath.Join(filepath.Dir(cfg), "b.toml")
	os.WriteFile(a, []byte("[debug]\n  level = \"info\"\n"), 0o644)
	os.WriteFile(b, nil, 0o644)
	multi := "version = 2\nimports = [\n  \"" + a + "\", # first\n  '" + b + "',\n]\n[plugins]\n"
	os.WriteFile(cfg, []byte(multi), 0o644)
	os.Remove(cfg + ".gpu-sandbox.json")
	os.Remove(cfg + ".gpu-sandbox.bak")
	if _, err := e.Apply(containerd.Settings{Runtimes: []containerd.Runtime{kata}}); err != nil {
		t.Fatal(err)
	}
	m := tree(t, cfg)
	if imports, _ := m["imports"].([]any); len(imports) != 3 || imports[2] != dropIn {
		t.Errorf("imports %v", m["imports"])
	}
	if _, err := e.Revert(); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(cfg); string(got) != multi {
		t.Errorf("after Revert:\n%s", got)
	}
}

// The administrator edits the main configuration while our entries are in:
// Revert keeps their edit and takes out only our import.
func TestRevertKeepsLaterEdits(t *testing.T) {
	cfg, dropIn := files(t, userV2)
	e := containerd.NewEditor(cfg, dropIn)
	if _, err := e.Apply(containerd.Settings{Runtimes: []containerd.Runtime{kata}}); err != nil {
		t.Fatal(err)
	}
	main, _ := os.ReadFile(cfg)
	edited := append(main, []byte("\n[metrics]\n  address = \"127.0.0.1:1338\"\n")...)
	os.WriteFile(cfg, edited, 0o644)
	if _, err := e.Revert(); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(cfg)
	if !bytes.Contains(got, []byte("127.0.0.1:1338")) || bytes.Contains(got, []byte(dropIn)) {
		t.Errorf("after Revert:\n%s", got)
	}
}

func TestInPlace(t *testing.T) {
	cfg, _ := files(t, userV2)
	e := containerd.NewEditor(cfg, "")
	if _, err := e.Apply(containerd.Settings{Runtimes: []containerd.Runtime{kata, snp}, CDISpecDirs: []string{"/var/run/cdi"}}); err != nil {
		t.Fatal(err)
	}
	m := tree(t, cfg)
	runtimes, _ := get(m, "plugins", "io.containerd.grpc.v1.cri", "containerd", "runtimes").(map[string]any)
	if runtimes[kata.Name] == nil || runtimes[snp.Name] == nil || runtimes["nvidia"] == nil || runtimes["runc"] == nil {
		t.Fatalf("runtimes after Apply: %v", runtimes)
	}
	if get(m, "plugins", "io.containerd.grpc.v1.cri", "enable_cdi") != true {
		t.Error("CDI not enabled")
	}
	// The administrator's lines are all there, comments and order included.
	main, _ := os.ReadFile(cfg)
	if !strings.HasPrefix(string(main), userV2[:strings.Index(userV2, "  sandbox_image")]) ||
		!strings.Contains(string(main), "  address = \"/run/containerd/containerd.sock\"  # the default\n") {
		t.Errorf("the administrator's file was rewritten, not added to:\n%s", main)
	}
	// A runtime class dropped from the configuration goes at the next Apply.
	if changed, err := e.Apply(containerd.Settings{Runtimes: []containerd.Runtime{kata}, CDISpecDirs: []string{"/var/run/cdi"}}); !changed || err != nil {
		t.Fatal(changed, err)
	}
	m = tree(t, cfg)
	if get(m, "plugins", "io.containerd.grpc.v1.cri", "containerd", "runtimes", snp.Name) != nil {
		t.Error("dropped runtime still there")
	}
	if changed, err := e.Apply(containerd.Settings{Runtimes: []containerd.Runtime{kata}, CDISpecDirs: []string{"/var/run/cdi"}}); changed || err != nil {
		t.Errorf("Apply of the same settings: %v, %v; want no change", changed, err)
	}
	// Another tool sets something meanwhile; it survives the Revert, byte
	// for byte, and the backup keeps what the file was before.
	b, _ := os.ReadFile(cfg)
	os.WriteFile(cfg, append(b, []byte("\n[debug]\n  level = \"debug\"\n")...), 0o644)
	if _, err := e.Revert(); err != nil {
		t.Fatal(err)
	}
	if got, want := mustReadFile(t, cfg), userV2+"\n[debug]\n  level = \"debug\"\n"; got != want {
		t.Errorf("after Revert\n%s\nwant\n%s", got, want)
	}
	if got := mustReadFile(t, cfg+".gpu-sandbox.bak"); got != userV2 {
		t.Errorf("backup holds\n%s\nwant the administrator's file before our last write", got)
	}
	if _, err := os.Stat(cfg + ".gpu-sandbox.json"); err == nil {
		t.Error("record left after Revert")
	}
}

func mustReadFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// routes runs a test on both routes.
func routes(t *testing.T, f func(t *testing.T, dropIn bool)) {
	t.Run("drop-in", func(t *testing.T) { f(t, true) })
	t.Run("in-place", func(t *testing.T) { f(t, false) })
}

func editor(cfg, dropIn string, useDropIn bool) *containerd.Editor {
	if !useDropIn {
		dropIn = ""
	}
	return containerd.NewEditor(cfg, dropIn)
}

var settings = containerd.Settings{Runtimes: []containerd.Runtime{kata}, CDISpecDirs: []string{"/etc/cdi", "/var/run/cdi"}}

// The administrator (or a template of config management) rewrites the
// file months after the first Apply; drift repair adds our entries to the
// new file; Revert gives back the new file, never the months-old one.
func TestRevertAfterAdminRewrite(t *testing.T) {
	routes(t, func(t *testing.T, useDropIn bool) {
		cfg, dropIn := files(t, userV2)
		e := editor(cfg, dropIn, useDropIn)
		if _, err := e.Apply(settings); err != nil {
			t.Fatal(err)
		}
		rewritten := strings.Replace(userV2, "pause:3.9", "pause:3.10", 1) + "\n[metrics]\n  address = \"127.0.0.1:1338\"\n"
		os.WriteFile(cfg, []byte(rewritten), 0o644)
		if changed, err := e.Apply(settings); !changed || err != nil {
			t.Fatalf("drift repair: %v, %v", changed, err)
		}
		if get(tree(t, cfg), "metrics", "address") != "127.0.0.1:1338" {
			t.Error("drift repair lost the administrator's rewrite")
		}
		if _, err := e.Revert(); err != nil {
			t.Fatal(err)
		}
		if got := mustReadFile(t, cfg); got != rewritten {
			t.Errorf("after Revert\n%s\nwant the administrator's rewrite byte for byte\n%s", got, rewritten)
		}
	})
}

// Edits right next to our lines: another import appended to the array we
// added to, a value changed on the line before ours, a table added after
// our block. Revert keeps each of them.
func TestRevertAfterEditsNextToOurs(t *testing.T) {
	routes(t, func(t *testing.T, useDropIn bool) {
		withImports := strings.Replace(userV2, "version = 2\n", "version = 2\nimports = [\"base.toml\"]\n", 1)
		cfg, dropIn := files(t, withImports)
		os.WriteFile(filepath.Join(filepath.Dir(cfg), "base.toml"), []byte("[debug]\n  level = \"info\"\n"), 0o644)
		os.WriteFile(filepath.Join(filepath.Dir(cfg), "site.toml"), []byte("[debug]\n  level = \"info\"\n"), 0o644)
		e := editor(cfg, dropIn, useDropIn)
		if _, err := e.Apply(settings); err != nil {
			t.Fatal(err)
		}
		applied := mustReadFile(t, cfg)
		edited := applied
		want := withImports
		if useDropIn {
			edited = strings.Replace(edited, "\""+dropIn+"\"]", "\""+dropIn+"\", \"site.toml\"]", 1)
			want = strings.Replace(want, "base.toml\"]", "base.toml\", \"site.toml\"]", 1)
		} else {
			// The line before our CDI lines, and a table after our block.
			edited = strings.Replace(edited, "pause:3.9", "pause:3.10", 1) + "[debug]\n  level = \"info\"\n"
			want = strings.Replace(want, "pause:3.9", "pause:3.10", 1) + "[debug]\n  level = \"info\"\n"
		}
		if edited == applied {
			t.Fatal("the test's edit did not apply")
		}
		os.WriteFile(cfg, []byte(edited), 0o644)
		if _, err := e.Revert(); err != nil {
			t.Fatal(err)
		}
		if got := mustReadFile(t, cfg); got != want {
			t.Errorf("after Revert\n%s\nwant\n%s", got, want)
		}
	})
}

// No config.toml at the first Apply: ours is created. The administrator
// then puts their own file there, and drift repair adds to it. Revert must
// not delete their file.
func TestRevertKeepsConfigCreatedLater(t *testing.T) {
	routes(t, func(t *testing.T, useDropIn bool) {
		cfg, dropIn := files(t, "\x00missing")
		e := editor(cfg, dropIn, useDropIn)
		if _, err := e.Apply(settings); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(cfg, []byte(userV2), 0o644)
		if _, err := e.Apply(settings); err != nil {
			t.Fatal(err)
		}
		if _, err := e.Revert(); err != nil {
			t.Fatal(err)
		}
		if got, err := os.ReadFile(cfg); err != nil || string(got) != userV2 {
			t.Errorf("after Revert: %q, %v; want the administrator's file", got, err)
		}
	})
}

// A setting the administrator has with another value is replaced in place,
// and given back with its comment.
func TestInPlaceReplacesValueAndGivesItBack(t *testing.T) {
	main := strings.Replace(userV2, "  sandbox_image", "  enable_cdi = false # off until the specs exist\n  sandbox_image", 1)
	cfg, _ := files(t, main)
	e := containerd.NewEditor(cfg, "")
	if _, err := e.Apply(settings); err != nil {
		t.Fatal(err)
	}
	if got := mustReadFile(t, cfg); !strings.Contains(got, "enable_cdi = true  # gpu-sandbox (was: false # off until the specs exist)\n") {
		t.Errorf("enable_cdi not replaced in place:\n%s", got)
	}
	if _, err := e.Revert(); err != nil {
		t.Fatal(err)
	}
	if got := mustReadFile(t, cfg); got != main {
		t.Errorf("after Revert\n%s\nwant\n%s", got, main)
	}
}

// A runtime of our name that someone else defined is theirs: reported,
// never overwritten.
func TestRuntimeDefinedByOthers(t *testing.T) {
	routes(t, func(t *testing.T, useDropIn bool) {
		main := userV2 + "    [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata-qemu-nvidia-gpu]\n      runtime_type = \"io.containerd.kata.v2\"\n"
		cfg, dropIn := files(t, main)
		_, err := editor(cfg, dropIn, useDropIn).Apply(settings)
		if !errors.Is(err, containerd.ErrRuntimeExists) || !strings.Contains(err.Error(), kata.Name) {
			t.Fatalf("error %v; want ErrRuntimeExists naming the runtime", err)
		}
		if got := mustReadFile(t, cfg); got != main {
			t.Errorf("the file changed:\n%s", got)
		}
	})
}

// CRLF files get CRLF lines, and come back byte for byte.
func TestCRLF(t *testing.T) {
	routes(t, func(t *testing.T, useDropIn bool) {
		main := strings.ReplaceAll(userV2, "\n", "\r\n")
		cfg, dropIn := files(t, main)
		e := editor(cfg, dropIn, useDropIn)
		if _, err := e.Apply(settings); err != nil {
			t.Fatal(err)
		}
		if got := mustReadFile(t, cfg); strings.Count(got, "\n") != strings.Count(got, "\r\n") {
			t.Errorf("mixed line endings:\n%q", got)
		}
		if _, err := e.Revert(); err != nil {
			t.Fatal(err)
		}
		if got := mustReadFile(t, cfg); got != main {
			t.Errorf("after Revert %q", got)
		}
	})
}

func TestInvalidConfigChangesNothing(t *testing.T) {
	bad := "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"\n  sandbox_image = 1\n"
	cfg, dropIn := files(t, bad)
	for _, route := range []string{dropIn, ""} {
		_, err := containerd.NewEditor(cfg, route).Apply(containerd.Settings{Runtimes: []containerd.Runtime{kata}})
		if !errors.Is(err, containerd.ErrInvalidConfig) || !strings.Contains(err.Error(), cfg) || !strings.Contains(err.Error(), "line 2") {
			t.Errorf("error %v; want ErrInvalidConfig naming the file and the line", err)
		}
		entries, _ := os.ReadDir(filepath.Dir(cfg))
		if got, _ := os.ReadFile(cfg); string(got) != bad || len(entries) != 1 {
			t.Errorf("files changed: %v", entries)
		}
	}
}

// A symbolic link stays one: the target is edited; a dangling link is an
// error and nothing is written.
func TestSymlinkedConfig(t *testing.T) {
	routes(t, func(t *testing.T, useDropIn bool) {
		cfg, dropIn := files(t, "\x00missing")
		real := filepath.Join(filepath.Dir(cfg), "real", "containerd.toml")
		os.MkdirAll(filepath.Dir(real), 0o755)
		os.WriteFile(real, []byte(userV2), 0o644)
		os.Symlink("real/containerd.toml", cfg)
		e := editor(cfg, dropIn, useDropIn)
		if _, err := e.Apply(settings); err != nil {
			t.Fatal(err)
		}
		if fi, err := os.Lstat(cfg); err != nil || fi.Mode()&os.ModeSymlink == 0 {
			t.Fatal("the link was replaced")
		}
		if got := mustReadFile(t, real); !strings.Contains(got, "gpu-sandbox") {
			t.Errorf("the target was not edited:\n%s", got)
		}
		if _, err := e.Revert(); err != nil {
			t.Fatal(err)
		}
		if got := mustReadFile(t, real); got != userV2 {
			t.Errorf("after Revert:\n%s", got)
		}

		os.Remove(real)
		_, err := editor(cfg, dropIn, useDropIn).Apply(settings)
		if !errors.Is(err, containerd.ErrInvalidConfig) || !strings.Contains(err.Error(), "symbolic link") {
			t.Errorf("dangling link: %v", err)
		}
		if _, err := os.Stat(dropIn); err == nil {
			t.Error("drop-in written for a dangling link")
		}
	})
}
