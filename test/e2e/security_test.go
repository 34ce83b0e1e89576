package e2e

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/artifacts"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
	"github.com/gpu-sandbox/gpu-sandbox/test/e2e/testbed"
)

// Links planted in the artifacts directory are not followed out of it.
func TestArtifactLinksAreNotFollowed(t *testing.T) {
	reg := testbed.StartRegistry(t, "", "")
	files := testbed.KataArtifact(60, 4096)
	testbed.PushArtifact(t, testbed.Repository(t, reg.Host, "kata", "", ""), "v", files)
	root, outside := t.TempDir(), t.TempDir()
	dir := filepath.Join(root, "rc")

	// The versions directory replaced by a link: refused, nothing written outside.
	if err := os.Symlink(outside, filepath.Join(root, ".rc.versions")); err != nil {
		t.Fatal(err)
	}
	_, err := artifacts.Pull(context.Background(), reg.Host+"/kata:v", dir, plain())
	if !errors.Is(err, artifacts.ErrUnsafeTitle) {
		t.Fatalf("pull through a linked versions directory: %v", err)
	}
	if entries, _ := os.ReadDir(outside); len(entries) != 0 {
		t.Fatalf("written outside: %v", entries)
	}
	os.Remove(filepath.Join(root, ".rc.versions"))

	// The directory itself a link elsewhere: the link is replaced, its target untouched.
	target := filepath.Join(outside, "victim")
	os.WriteFile(target, []byte("keep"), 0o644)
	if err := os.Symlink(outside, dir); err != nil {
		t.Fatal(err)
	}
	if _, err := artifacts.Pull(context.Background(), reg.Host+"/kata:v", dir, plain()); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(target); string(b) != "keep" {
		t.Error("the old link's target was changed")
	}
	if resolved, _ := filepath.EvalSymlinks(dir); !strings.HasPrefix(resolved, root) {
		t.Errorf("the directory resolves to %s, outside %s", resolved, root)
	}
	checkFiles(t, dir, files)
}

// Files are created with the narrowest modes that work (docs/reliability.md).
func TestFileModes(t *testing.T) {
	reg := testbed.StartRegistry(t, "", "")
	ref := reg.Host + "/nvidia/kata-gpu-artifacts:v1"
	testbed.PushArtifact(t, testbed.Repository(t, reg.Host, "nvidia/kata-gpu-artifacts", "", ""), "v1", testbed.KataArtifact(61, 4096))
	n := newKataNode(t, classConfig("kata-qemu-nvidia-gpu", ref))
	if r := run(t, "kata-manager", nil, n.args("--once")...); r.code != 0 {
		t.Fatal(r)
	}
	rc := filepath.Join(n.artifacts, "kata-qemu-nvidia-gpu")
	for path, want := range map[string]os.FileMode{
		n.main:                       0o644, // the administrator's mode, kept
		n.dropIn:                     0o644, // containerd's configuration is not secret
		n.main + ".gpu-sandbox.json": 0o600,
		n.main + ".gpu-sandbox.bak":  0o600,
		filepath.Join(rc, "vmlinuz-6.1.62-nvidia-gpu"):             0o644, // read by the Kata shim and QEMU
		filepath.Join(rc, "gpu-sandbox-kata-qemu-nvidia-gpu.toml"): 0o644,
		filepath.Join(rc, ".artifact.json"):                        0o644,
	} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Errorf("%s: %v", path, err)
			continue
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s: mode %v, want %v", filepath.Base(path), fi.Mode().Perm(), want)
		}
	}

	v := newNode(t, vfiotest.A10WithAudio())
	if r := v.vfioManager(t, nil, "bind", "--all"); r.code != 0 {
		t.Fatal(r)
	}
	for path, want := range map[string]os.FileMode{v.state: 0o700, filepath.Join(v.state, "0000:65:00.0.json"): 0o600} {
		if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != want {
			t.Errorf("%s: %v %v, want %v", path, fi.Mode().Perm(), err, want)
		}
	}
}

// A pull secret's content never reaches a log line or an error, whether
// the credentials are right or wrong.
func TestPullSecretsStayOutOfLogs(t *testing.T) {
	const user, password = "ngc", "Zm9vYmFyc2VjcmV0-very-secret"
	reg := testbed.StartRegistry(t, user, password)
	testbed.PushArtifact(t, testbed.Repository(t, reg.Host, "private/kata", user, password), "v1", testbed.KataArtifact(62, 4096))
	secrets := t.TempDir()
	for name, pw := range map[string]string{"good": password, "bad": password + "-wrong"} {
		os.MkdirAll(filepath.Join(secrets, name), 0o700)
		os.WriteFile(filepath.Join(secrets, name, ".dockerconfigjson"),
			[]byte(`{"auths":{"`+reg.Host+`":{"auth":"`+encodeBase64(user+":"+pw)+`"}}}`), 0o600)
	}
	for _, secret := range []string{"good", "bad"} {
		cfg := strings.Replace(classConfig("kata-qemu-nvidia-gpu", reg.Host+"/private/kata:v1"), `pullSecret: ""`, "pullSecret: "+secret, 1)
		n := newKataNode(t, cfg)
		r := run(t, "kata-manager", nil, n.args("--once", "--pull-secrets-dir", secrets, "--log-level", "debug")...)
		if (r.code == 0) != (secret == "good") {
			t.Fatalf("secret %s: %s", secret, r)
		}
		for _, leak := range []string{password, encodeBase64(user + ":" + password), encodeBase64(user + ":" + password + "-wrong")} {
			if strings.Contains(r.stdout+r.stderr, leak) {
				t.Errorf("secret %s: the output shows credentials:\n%s", secret, r)
			}
		}
		if secret == "bad" && !strings.Contains(r.stderr, "unauthorized") {
			t.Errorf("wrong credentials not reported as such:\n%s", r.stderr)
		}
	}
}

// vfio-manager touches nothing the selection did not name: not another GPU,
// not a NIC, not a bridge.
func TestVFIOManagerTouchesOnlyTheSelection(t *testing.T) {
	n := newNode(t, vfiotest.HGXH100())
	before := map[string][2]string{}
	for _, addr := range append(append([]string{"0000:17:00.0"}, vfiotest.HGXH100GPUs...), vfiotest.HGXH100NVSwitches...) {
		before[addr] = [2]string{n.tree.Driver(addr), n.tree.DriverOverride(addr)}
	}
	if r := n.vfioManager(t, nil, "bind", "--device-id", "0000:5d:00.0"); r.code != 0 {
		t.Fatal(r)
	}
	for addr, was := range before {
		now := [2]string{n.tree.Driver(addr), n.tree.DriverOverride(addr)}
		if addr == "0000:5d:00.0" {
			continue
		}
		if now != was {
			t.Errorf("%s changed from %v to %v", addr, was, now)
		}
	}
	entries, _ := os.ReadDir(n.state)
	if len(entries) != 1 || entries[0].Name() != "0000:5d:00.0.json" {
		t.Errorf("state records: %v", entries)
	}
}
