package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	ctd2config "github.com/containerd/containerd/v2/cmd/containerd/server/config"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/containerd"
	"github.com/gpu-sandbox/gpu-sandbox/test/e2e/testbed"
)

// A version 3 configuration, as containerd 2.x writes and documents it
// (`containerd config default` of 2.x: CRI runtimes under
// io.containerd.cri.v1.runtime, images under io.containerd.cri.v1.images).
const containerd2Config = `version = 3
root = '/var/lib/containerd'
state = '/run/containerd'

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'

  [plugins.'io.containerd.cri.v1.runtime']
    enable_selinux = false
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes]
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
          runtime_type = 'io.containerd.runc.v2'
          [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
            SystemdCgroup = true
`

// containerd 2.x merges imported tables: the version 3 drop-in holds only
// the new runtime, and containerd 2's own loader reads runc, the Kata runtime
// and CDI together. Debian's containerd 1.6 cannot read version 3 at all, so
// the loader of containerd/v2 (v2.4.2) is the judge here.
func TestContainerd2ReadsTheVersion3DropIn(t *testing.T) {
	dir := t.TempDir()
	main, dropIn := filepath.Join(dir, "config.toml"), filepath.Join(dir, "conf.d", "99-gpu-sandbox.toml")
	os.WriteFile(main, []byte(containerd2Config), 0o644)
	e := containerd.NewEditor(main, dropIn)
	if _, err := e.Apply(containerd.Settings{Runtimes: []containerd.Runtime{{
		Name: "kata-qemu-nvidia-gpu", Type: "io.containerd.kata-qemu-nvidia-gpu.v2", ConfigPath: "/opt/k/config.toml",
		PodAnnotations: []string{"io.katacontainers.*", "cdi.k8s.io/*"}}}, CDISpecDirs: []string{"/etc/cdi", "/var/run/cdi"}}); err != nil {
		t.Fatal(err)
	}
	var cfg ctd2config.Config
	if err := ctd2config.LoadConfig(context.Background(), main, &cfg); err != nil {
		t.Fatalf("containerd 2 cannot load the configuration: %v", err)
	}
	cri, _ := cfg.Plugins["io.containerd.cri.v1.runtime"].(map[string]any)
	runtimes, _ := lookupMap(cri, "containerd", "runtimes")
	kata, _ := runtimes["kata-qemu-nvidia-gpu"].(map[string]any)
	runc, _ := runtimes["runc"].(map[string]any)
	if kata["runtime_type"] != "io.containerd.kata-qemu-nvidia-gpu.v2" || kata["privileged_without_host_devices"] != true {
		t.Errorf("kata runtime as containerd 2 reads it: %v", kata)
	}
	if opts, _ := runc["options"].(map[string]any); opts["SystemdCgroup"] != true {
		t.Errorf("runc lost its options in the merge: %v", runc)
	}
	if cri["enable_cdi"] != true || cri["enable_selinux"] != false {
		t.Errorf("CRI runtime settings: %v", cri)
	}
	if images, _ := cfg.Plugins["io.containerd.cri.v1.images"].(map[string]any); images["snapshotter"] != "overlayfs" {
		t.Errorf("images plugin: %v", cfg.Plugins["io.containerd.cri.v1.images"])
	}
	if _, err := e.Revert(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(main); string(b) != containerd2Config {
		t.Errorf("not given back byte for byte:\n%s", b)
	}
}

func lookupMap(m map[string]any, keys ...string) (map[string]any, bool) {
	for _, k := range keys {
		next, ok := m[k].(map[string]any)
		if !ok {
			return nil, false
		}
		m = next
	}
	return m, true
}

// The in-place route writes marked text into the administrator's file:
// containerd itself must read it as meant, on 1.6 (Debian's binary, the
// running daemon through crictl) and 2.x (its own loader), and revert
// after the administrator's edits next to our lines keeps their bytes.
func TestInPlaceEditsLoadInContainerd(t *testing.T) {
	settings := containerd.Settings{Runtimes: []containerd.Runtime{{
		Name: "kata-qemu-nvidia-gpu", Type: "io.containerd.kata-qemu-nvidia-gpu.v2", ConfigPath: "/opt/k/config.toml",
		PodAnnotations: []string{"io.katacontainers.*", "cdi.k8s.io/*"}}}, CDISpecDirs: []string{"/etc/cdi", "/var/run/cdi"}}

	t.Run("containerd 1.6", func(t *testing.T) {
		n := newKataNode(t, "")
		e := containerd.NewEditor(n.main, "")
		if _, err := e.Apply(settings); err != nil {
			t.Fatal(err)
		}
		ctd := testbed.StartContainerd(t, n.main, n.socket())
		runtimes := criRuntimes(t, ctd.Socket)
		if runtimes["kata-qemu-nvidia-gpu"] == nil || runtimes["runc"] == nil {
			t.Fatalf("CRI runtimes: %v", runtimes)
		}
		// The administrator edits the line above our CDI lines and adds a
		// table after our block; drift repair runs; then revert.
		b, _ := os.ReadFile(n.main)
		edited := strings.Replace(string(b), "pause:3.9", "pause:3.10", 1) + "\n[metrics]\n  address = \"127.0.0.1:1338\"\n"
		os.WriteFile(n.main, []byte(edited), 0o644)
		if _, err := e.Apply(settings); err != nil {
			t.Fatal(err)
		}
		dump := dumpConfig(t, n.main)
		for _, want := range []string{"runtimes.kata-qemu-nvidia-gpu]", "pause:3.10", "127.0.0.1:1338"} {
			if !strings.Contains(dump, want) {
				t.Errorf("containerd's reading lacks %s:\n%s", want, dump)
			}
		}
		if _, err := e.Revert(); err != nil {
			t.Fatal(err)
		}
		want := strings.Replace(string(n.original), "pause:3.9", "pause:3.10", 1) + "\n[metrics]\n  address = \"127.0.0.1:1338\"\n"
		if got, _ := os.ReadFile(n.main); string(got) != want {
			t.Errorf("after revert:\n%s\nwant\n%s", got, want)
		}
	})

	t.Run("containerd 2", func(t *testing.T) {
		main := filepath.Join(t.TempDir(), "config.toml")
		os.WriteFile(main, []byte(containerd2Config), 0o644)
		e := containerd.NewEditor(main, "")
		if _, err := e.Apply(settings); err != nil {
			t.Fatal(err)
		}
		var cfg ctd2config.Config
		if err := ctd2config.LoadConfig(context.Background(), main, &cfg); err != nil {
			t.Fatalf("containerd 2 cannot load the configuration: %v", err)
		}
		cri, _ := cfg.Plugins["io.containerd.cri.v1.runtime"].(map[string]any)
		runtimes, _ := lookupMap(cri, "containerd", "runtimes")
		if kata, _ := runtimes["kata-qemu-nvidia-gpu"].(map[string]any); kata["runtime_type"] != "io.containerd.kata-qemu-nvidia-gpu.v2" {
			t.Errorf("kata runtime as containerd 2 reads it: %v", runtimes)
		}
		if cri["enable_cdi"] != true || cri["enable_selinux"] != false {
			t.Errorf("CRI runtime settings: %v", cri)
		}
		if _, err := e.Revert(); err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(main); string(b) != containerd2Config {
			t.Errorf("not given back byte for byte:\n%s", b)
		}
	})
}
