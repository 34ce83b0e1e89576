package e2e

import (
	"errors"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/containerd"
	"github.com/gpu-sandbox/gpu-sandbox/test/e2e/testbed"
)

// layout is a node's containerd configuration directory as a distribution,
// a cloud image or an installer leaves it: files by path relative to the
// directory ({dir} stands for it), config.toml being the main one. The
// shapes follow what each tool writes (see docs/testing.md); the contents
// are our own.
type layout struct {
	name  string
	files map[string]string
	// link makes config.toml a symbolic link to this file.
	link string
}

var layouts = []layout{
	{name: "debian-1.6-default", files: map[string]string{"config.toml": debianDefault}},
	{name: "debian-crlf", files: map[string]string{"config.toml": strings.ReplaceAll(debianDefault, "\n", "\r\n")}},
	{name: "empty", files: map[string]string{"config.toml": ""}},
	{name: "v1-no-version", files: map[string]string{"config.toml": `[plugins.cri.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
`}},
	{name: "nvidia-ctk-1.19-conf.d", files: map[string]string{
		"config.toml": `imports = ["{dir}/conf.d/*.toml"]
version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "{dir}/opt"
`,
		"conf.d/99-nvidia.toml": `version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes]
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]
          privileged_without_host_devices = false
          runtime_type = "io.containerd.runc.v2"
          [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia.options]
            BinaryName = "/usr/bin/nvidia-container-runtime"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
          runtime_type = "io.containerd.runc.v2"
`}},
	{name: "nvidia-ctk-1.18-config.d", files: map[string]string{
		"config.toml": "imports = [\"{dir}/config.d/*.toml\"]\nversion = 2\n",
		"config.d/99-nvidia.toml": `version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "nvidia"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]
  runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia.options]
    BinaryName = "/usr/bin/nvidia-container-runtime"
`}},
	{name: "containerd-2.2-default-with-nvidia-ctk", files: map[string]string{
		"config.toml": `version = 3
root = '{dir}/root'
state = '{dir}/state'
imports = ['{dir}/conf.d/*.toml']

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
          sandboxer = 'podsandbox'
          [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
            SystemdCgroup = true
`,
		"conf.d/99-nvidia.toml": `version = 3
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.nvidia]
  runtime_type = "io.containerd.runc.v2"
  sandboxer = "podsandbox"
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.nvidia.options]
    BinaryName = "/usr/bin/nvidia-container-runtime"
    SystemdCgroup = true
`}},
	{name: "containerd-2.4-default", files: map[string]string{"config.toml": `version = 4
imports = ['{dir}/conf.d/*.toml']

[plugins]
  [plugins.'io.containerd.cri.v1.runtime']
    enable_cdi = true
    cdi_spec_dirs = ['/etc/cdi', '/var/run/cdi']
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
  [plugins.'io.containerd.server.v1.grpc']
    address = '{dir}/containerd.sock'
`}},
	{name: "kata-deploy-conf.d", files: map[string]string{
		"config.toml": "version = 3\nimports = ['{dir}/conf.d/*.toml']\n",
		"conf.d/kata-deploy.toml": `[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.kata-qemu-nvidia-gpu]
runtime_type = "io.containerd.kata-qemu-nvidia-gpu.v2"
runtime_path = "/opt/kata/bin/containerd-shim-kata-v2"
privileged_without_host_devices = true
pod_annotations = ["io.katacontainers.*"]
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.kata-qemu-nvidia-gpu.options]
ConfigPath = "/opt/kata/share/defaults/kata-containers/configuration-qemu-nvidia-gpu.toml"
`}},
	{name: "kata-deploy-opt-kata", files: map[string]string{
		"config.toml": "version = 3\nimports = [\"{dir}/kata/containerd/config.d/kata-deploy.toml\"]\n",
		"kata/containerd/config.d/kata-deploy.toml": `[plugins."io.containerd.cri.v1.runtime".containerd.runtimes."kata-qemu-nvidia-gpu"]
runtime_type = "io.containerd.kata-qemu-nvidia-gpu.v2"
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes."kata-qemu-nvidia-gpu".options]
ConfigPath = "/opt/kata/share/defaults/kata-containers/configuration-qemu-nvidia-gpu.toml"
`}},
	{name: "aks-containerd2", files: map[string]string{"config.toml": `version = 2
oom_score = -999
[plugins."io.containerd.cri.v1.images"]
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "/etc/containerd/certs.d"
[plugins."io.containerd.cri.v1.runtime".containerd]
  default_runtime_name = "runc"
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
    BinaryName = "/usr/bin/runc"
    SystemdCgroup = true
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.untrusted]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.untrusted.options]
    BinaryName = "/usr/bin/runc"
[metrics]
  address = "0.0.0.0:10257"
`}},
	{name: "aks-mixed-with-kata", files: map[string]string{"config.toml": `version = 2
[plugins."io.containerd.cri.v1.runtime".containerd]
  default_runtime_name = "runc"
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]
  runtime_type = "io.containerd.kata.v2"
  privileged_without_host_devices = true
`}},
	{name: "eks-1.7", files: map[string]string{"config.toml": `version = 2
root = "{dir}/root"
state = "{dir}/state"

[grpc]
address = "{dir}/containerd.sock"

[plugins."io.containerd.grpc.v1.cri".containerd]
default_runtime_name = "runc"
discard_unpacked_layers = true

[plugins."io.containerd.grpc.v1.cri"]
sandbox_image = "602401143452.dkr.ecr.us-west-2.amazonaws.com/eks/pause:3.5"
enable_cdi = true

[plugins."io.containerd.grpc.v1.cri".registry]
config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
runtime_type = "io.containerd.runc.v2"
base_runtime_spec = "/etc/containerd/base-runtime-spec.json"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
BinaryName = "/usr/sbin/runc"
SystemdCgroup = true
`}},
	{name: "eks-2.x", files: map[string]string{"config.toml": `version = 3
root = "{dir}/root"

[plugins.'io.containerd.cri.v1.images']
discard_unpacked_layers = true

[plugins."io.containerd.cri.v1.images".registry]
config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"

[plugins.'io.containerd.cri.v1.runtime']
enable_cdi = true

[plugins.'io.containerd.cri.v1.runtime'.containerd]
default_runtime_name = 'runc'

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
runtime_type = 'io.containerd.runc.v2'

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
BinaryName = '/usr/sbin/runc'
SystemdCgroup = true
`}},
	{name: "k3s-v3-rendered", files: map[string]string{
		"config.toml": `version = 3
imports = ['{dir}/config-v3.toml.d/*.toml']
root = "{dir}/root"
state = "{dir}/state"

[plugins.'io.containerd.cri.v1.runtime']
  enable_selinux = false
[plugins.'io.containerd.cri.v1.runtime'.containerd]
  default_runtime_name = "runc"
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.'runc']
  runtime_type = "io.containerd.runc.v2"
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.'runc'.options]
  SystemdCgroup = true
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.'nvidia']
  runtime_type = "io.containerd.runc.v2"
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.'nvidia'.options]
  BinaryName = "/usr/local/nvidia/toolkit/nvidia-container-runtime"
  SystemdCgroup = true
`,
		"config-v3.toml.d/.keep": ""}},
	{name: "k0s-two-level", files: map[string]string{
		"config.toml":              "# k0s_managed=false\nversion = 2\nimports = [\"{dir}/containerd.d/*.toml\"]\n",
		"containerd.d/nvidia.toml": "imports = [\"{dir}/conf.d/*.toml\"]\nversion = 2\n",
		"conf.d/99-nvidia.toml": `version = 2
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
`}},
	{name: "image-builder-self-import", files: map[string]string{
		"config.toml":  "version = 2\nimports = [\"{dir}/config.toml\", \"{dir}/conf.d/*.toml\"]\n" + debianTables,
		"conf.d/.keep": ""}},
	{name: "symlinked", link: "real/containerd.toml", files: map[string]string{
		"real/containerd.toml": "version = 2\nimports = [\"conf.d/*.toml\"]\n" + debianTables,
		"conf.d/10-debug.toml": "[debug]\n  level = \"info\"\n"}},
	{name: "glob-matching-nothing", files: map[string]string{"config.toml": "version = 2\nimports = [\"{dir}/none.d/*.toml\"]\n" + debianTables}},
	{name: "import-cycle", files: map[string]string{
		"config.toml": "version = 2\nimports = [\"{dir}/a.toml\"]\n" + debianTables,
		"a.toml":      "version = 2\nimports = [\"{dir}/config.toml\"]\n"}},
	{name: "missing-import", files: map[string]string{"config.toml": "version = 2\nimports = [\"{dir}/nope.toml\"]\n" + debianTables}},
	{name: "import-not-toml", files: map[string]string{
		"config.toml":      "version = 2\nimports = [\"{dir}/conf.d/*.toml\"]\n" + debianTables,
		"conf.d/junk.toml": "this is not TOML\n"}},
	{name: "runc-lost-already", files: map[string]string{
		"config.toml": `version = 2
imports = ["{dir}/conf.d/*.toml"]
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
`,
		"conf.d/50-other.toml": `version = 2
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.other]
  runtime_type = "io.containerd.runc.v2"
`}},
}

const debianTables = `
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "{dir}/opt"
`

const debianDefault = "version = 2\n" + debianTables

// mustApply lists where Apply has to succeed on the drop-in route: the
// layouts of the issue, on the releases that run them.
var mustApply = map[string][]string{
	"debian-1.6-default":                     {"1.6", "1.7", "2.0", "2.2", "2.4"},
	"debian-crlf":                            {"1.6", "1.7", "2.0", "2.2", "2.4"},
	"empty":                                  {"1.6", "1.7", "2.0", "2.2", "2.4"},
	"v1-no-version":                          {"1.6", "1.7", "2.4"},
	"nvidia-ctk-1.19-conf.d":                 {"1.6", "1.7", "2.0", "2.2", "2.4"},
	"nvidia-ctk-1.18-config.d":               {"1.6", "1.7", "2.0", "2.2", "2.4"},
	"containerd-2.2-default-with-nvidia-ctk": {"2.2", "2.4"},
	"containerd-2.4-default":                 {"2.4"},
	"aks-containerd2":                        {"2.0", "2.2", "2.4"},
	"eks-1.7":                                {"1.6", "1.7"},
	"eks-2.x":                                {"2.0", "2.2", "2.4"},
	"k3s-v3-rendered":                        {"2.0", "2.2", "2.4"},
	// On 1.x the conf.d file, imported by an import, loads after anything
	// the main file imports and replaces the CRI table: refused there.
	"k0s-two-level":             {"2.0", "2.2", "2.4"},
	"image-builder-self-import": {"1.6", "1.7", "2.0", "2.2", "2.4"},
	"symlinked":                 {"1.6", "1.7", "2.0", "2.2", "2.4"},
	"glob-matching-nothing":     {"1.6", "1.7", "2.0", "2.2", "2.4"},
	"import-cycle":              {"1.6", "1.7", "2.0", "2.2", "2.4"},
}

// mustRefuse lists where Apply has to refuse, on which releases, and the
// error it wraps.
var mustRefuse = map[string]struct {
	err      error
	releases []string
}{
	"kata-deploy-conf.d":     {containerd.ErrRuntimeExists, []string{"2.0", "2.2", "2.4"}},
	"kata-deploy-opt-kata":   {containerd.ErrRuntimeExists, []string{"2.0", "2.2", "2.4"}},
	"aks-mixed-with-kata":    {containerd.ErrNotEffective, []string{"2.0", "2.2", "2.4"}},
	"runc-lost-already":      {containerd.ErrNotEffective, []string{"1.6", "1.7"}},
	"missing-import":         {containerd.ErrInvalidConfig, releases},
	"import-not-toml":        {containerd.ErrInvalidConfig, releases},
	"containerd-2.4-default": {containerd.ErrInvalidConfig, []string{"1.6", "1.7", "2.0", "2.2"}},
}

var releases = []string{"1.6", "1.7", "2.0", "2.2", "2.4"}

// containerdBinary is the containerd of a release: Debian's for 1.6, the
// ones hack/fetch-containerd.sh builds for the others.
func containerdBinary(t *testing.T, release string) string {
	t.Helper()
	if release == "1.6" {
		return testbed.Program(t, "containerd")
	}
	full := map[string]string{"1.7": "1.7.35", "2.0": "2.0.14", "2.2": "2.2.9", "2.4": "2.4.2"}[release]
	bin := filepath.Join(repoRoot(), ".cache", "containerd", full, "containerd")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("containerd %s is missing: run hack/fetch-containerd.sh (make test does)", full)
	}
	return bin
}

// lay writes a layout into a fresh directory and returns its main file and
// every file's bytes.
func lay(t *testing.T, l layout) (string, map[string][]byte) {
	t.Helper()
	dir := t.TempDir()
	files := map[string][]byte{}
	for rel, content := range l.files {
		p := filepath.Join(dir, rel)
		os.MkdirAll(filepath.Dir(p), 0o755)
		b := []byte(strings.ReplaceAll(content, "{dir}", dir))
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		files[p] = b
	}
	main := filepath.Join(dir, "config.toml")
	if l.link != "" {
		if err := os.Symlink(l.link, main); err != nil {
			t.Fatal(err)
		}
	}
	return main, files
}

// dump is a release's own reading of a configuration: its plugins, or an
// error when it would not start. containerd 2.x's dump ignores a missing
// import (the daemon does not), so missing imports are checked here too.
func dump(t *testing.T, release, main string, e *containerd.Effective) (map[string]any, error) {
	t.Helper()
	var stderr strings.Builder
	cmd := exec.Command(containerdBinary(t, release), "--config", main, "config", "dump")
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, errors.New(stderr.String())
	}
	if e != nil {
		for _, f := range e.Files {
			if _, err := os.Stat(f); err != nil {
				return nil, err
			}
		}
	}
	var tree struct {
		Plugins map[string]any `toml:"plugins"`
	}
	if err := toml.Unmarshal(out, &tree); err != nil {
		t.Fatalf("containerd %s dump is not TOML: %v\n%s", release, err, out)
	}
	return tree.Plugins, nil
}

func criOf(plugins map[string]any, release string) map[string]any {
	id := "io.containerd.cri.v1.runtime"
	if release[0] == '1' {
		id = "io.containerd.grpc.v1.cri"
	}
	t, _ := plugins[id].(map[string]any)
	return t
}

func runtimesOf(cri map[string]any) map[string]any {
	c, _ := cri["containerd"].(map[string]any)
	rs, _ := c["runtimes"].(map[string]any)
	return rs
}

// Our reading of every layout agrees with each release's own: the same
// runtimes, and a failure where containerd would not start.
func TestEffectiveConfigAgreesWithContainerd(t *testing.T) {
	for _, l := range layouts {
		for _, rel := range releases {
			t.Run(l.name+"/"+rel, func(t *testing.T) {
				main, _ := lay(t, l)
				r, _ := containerd.ParseRelease(rel)
				e, ourErr := containerd.LoadEffective(main, r)
				plugins, theirErr := dump(t, rel, main, e)
				if ourErr != nil && theirErr == nil && rel[0] == '2' && l.name == "missing-import" {
					// 2.x's config dump passes over a missing import; the
					// daemon does not: it stops before it touches anything.
					out, err := exec.Command(containerdBinary(t, rel), "--config", main).CombinedOutput()
					if err == nil || !strings.Contains(string(out), "nope.toml") {
						t.Fatalf("containerd %s started with a missing import: %v\n%s", rel, err, out)
					}
					return
				}
				if (ourErr != nil) != (theirErr != nil) {
					t.Fatalf("we say %v, containerd %s says %v", ourErr, rel, theirErr)
				}
				if ourErr != nil {
					return
				}
				want := slices.Sorted(maps.Keys(runtimesOf(criOf(plugins, rel))))
				got := slices.Sorted(maps.Keys(e.Runtimes()))
				if len(got) == 0 || rel[0] == '2' && !slices.Contains(got, "runc") {
					// The built-in one: 1.x keeps it only when the files
					// set no runtime, 2.x merges the files into it.
					got = slices.Sorted(slices.Values(append(got, "runc")))
				}
				if !slices.Equal(got, want) {
					t.Errorf("runtimes: we read %v, containerd %s reads %v", got, rel, want)
				}
			})
		}
	}
}

// Apply on every layout and release, both routes: where it writes, the
// release's containerd serves our runtime as written and every runtime and
// CRI setting it served before unchanged, and Revert gives back every file
// byte for byte; where it refuses, nothing changed. Layouts of the issue
// must succeed (mustApply) or be refused for a named reason (mustRefuse).
func TestApplyOnRealLayouts(t *testing.T) {
	kata := containerd.Runtime{Name: "kata-qemu-nvidia-gpu", Type: "io.containerd.kata-qemu-nvidia-gpu.v2",
		ConfigPath:     "/opt/nvidia-gpu-operator/artifacts/runtimeclasses/kata-qemu-nvidia-gpu/gpu-sandbox-kata-qemu-nvidia-gpu.toml",
		PodAnnotations: []string{"io.katacontainers.*", "cdi.k8s.io/*"}}
	for _, l := range layouts {
		for _, rel := range releases {
			for _, route := range []string{"drop-in", "in-place"} {
				t.Run(l.name+"/"+rel+"/"+route, func(t *testing.T) {
					main, files := lay(t, l)
					r, _ := containerd.ParseRelease(rel)
					dropIn := "gpu-sandbox/runtimes.toml"
					if route == "in-place" {
						dropIn = ""
					}
					e := containerd.NewEditor(main, dropIn)
					beforeEff, _ := containerd.LoadEffective(main, r)
					before, beforeErr := dump(t, rel, main, beforeEff)
					_, err := e.Apply(containerd.Settings{Runtimes: []containerd.Runtime{kata}, CDISpecDirs: []string{"/etc/cdi", "/var/run/cdi"}, Release: r})
					if want, ok := mustRefuse[l.name]; ok && slices.Contains(want.releases, rel) && !errors.Is(err, want.err) {
						t.Errorf("Apply = %v; want %v", err, want.err)
					}
					if route == "drop-in" && slices.Contains(mustApply[l.name], rel) && err != nil {
						t.Errorf("Apply: %v", err)
					}
					if err != nil {
						unchanged(t, main, files)
						return
					}
					if beforeErr != nil {
						t.Fatalf("Apply wrote to a configuration containerd %s does not load: %v", rel, beforeErr)
					}
					afterEff, _ := containerd.LoadEffective(main, r)
					after, err := dump(t, rel, main, afterEff)
					if err != nil {
						t.Fatalf("containerd %s does not load what Apply wrote: %v", rel, err)
					}
					got, _ := runtimesOf(criOf(after, rel))[kata.Name].(map[string]any)
					opts, _ := got["options"].(map[string]any)
					if got["runtime_type"] != kata.Type || opts["ConfigPath"] != kata.ConfigPath {
						t.Errorf("containerd %s serves %s as %v", rel, kata.Name, got)
					}
					wantCRI, gotCRI := criOf(before, rel), criOf(after, rel)
					for _, m := range []map[string]any{wantCRI, gotCRI} {
						delete(m, "enable_cdi")
						delete(m, "cdi_spec_dirs")
						delete(runtimesOf(m), kata.Name)
					}
					// A key at its zero value is one containerd does not set:
					// the built-in runc and the one we spell out for 1.x are
					// the same runtime.
					wantCRI, gotCRI = dropZero(wantCRI), dropZero(gotCRI)
					if !reflect.DeepEqual(gotCRI, wantCRI) {
						t.Errorf("containerd %s's CRI settings changed beyond ours:\n%v\nwant\n%v", rel, gotCRI, wantCRI)
					}
					if _, err := e.Revert(); err != nil {
						t.Fatal(err)
					}
					unchanged(t, main, files)
					if fi, err := os.Lstat(main); l.link != "" && (err != nil || fi.Mode()&os.ModeSymlink == 0) {
						t.Error("the symbolic link was replaced by a file")
					}
				})
			}
		}
	}
}

// unchanged checks that every file of a layout holds its bytes, and that
// nothing else is left but the editor's backup.
func unchanged(t *testing.T, main string, files map[string][]byte) {
	t.Helper()
	dir := filepath.Dir(main)
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Type()&os.ModeSymlink != 0 {
			return nil
		}
		want, ok := files[p]
		if !ok {
			if !strings.HasSuffix(p, ".gpu-sandbox.bak") {
				t.Errorf("%s left behind", p)
			}
			return nil
		}
		if got, _ := os.ReadFile(p); string(got) != string(want) {
			t.Errorf("%s changed:\n%s", p, got)
		}
		return nil
	})
}

// dropZero removes, recursively, the keys whose values are zero: "",
// false, 0, and empty tables and arrays.
func dropZero(m map[string]any) map[string]any {
	out := map[string]any{}
	for k, v := range m {
		switch v := v.(type) {
		case map[string]any:
			if sub := dropZero(v); len(sub) > 0 {
				out[k] = sub
			}
		case []any:
			if len(v) > 0 {
				out[k] = v
			}
		case string, bool, int64, float64:
			if !reflect.ValueOf(v).IsZero() {
				out[k] = v
			}
		default:
			out[k] = v
		}
	}
	return out
}

// The GPU Operator mounts the host's /etc/containerd at /runtime/config-dir
// in the agent's container. The default drop-in is relative to the main
// file and imported so: written through the container's path, it is what
// the host's containerd, reading the host's path, loads.
func TestDropInUnderAnotherMount(t *testing.T) {
	host := filepath.Join(t.TempDir(), "etc", "containerd")
	os.MkdirAll(host, 0o755)
	os.WriteFile(filepath.Join(host, "config.toml"), []byte(strings.ReplaceAll(debianDefault, "{dir}", host)), 0o644)
	mounted := filepath.Join(t.TempDir(), "config-dir") // the container's view of the same directory
	if err := os.Symlink(host, mounted); err != nil {
		t.Fatal(err)
	}
	e := containerd.NewEditor(filepath.Join(mounted, "config.toml"), containerd.DefaultDropInPath)
	kata := containerd.Runtime{Name: "kata-qemu-nvidia-gpu", Type: "io.containerd.kata-qemu-nvidia-gpu.v2", ConfigPath: "/opt/k/c.toml"}
	if _, err := e.Apply(containerd.Settings{Runtimes: []containerd.Runtime{kata}}); err != nil {
		t.Fatal(err)
	}
	main, _ := os.ReadFile(filepath.Join(host, "config.toml"))
	if strings.Contains(string(main), mounted) || !strings.Contains(string(main), `imports = ["gpu-sandbox/runtimes.toml"]`) {
		t.Errorf("the import names a path of the container:\n%s", main)
	}
	plugins, err := dump(t, "1.6", filepath.Join(host, "config.toml"), nil)
	if err != nil {
		t.Fatalf("the host's containerd cannot load it: %v", err)
	}
	if runtimesOf(criOf(plugins, "1.6"))[kata.Name] == nil {
		t.Errorf("the host's containerd does not serve %s", kata.Name)
	}
}

// kata-deploy already serves a runtime of our name: refused unless told to
// take it over; taken over, containerd serves ours.
func TestReplaceKataDeploysRuntime(t *testing.T) {
	for _, rel := range []string{"2.0", "2.2", "2.4"} {
		t.Run(rel, func(t *testing.T) {
			var l layout
			for _, x := range layouts {
				if x.name == "kata-deploy-conf.d" {
					l = x
				}
			}
			main, _ := lay(t, l)
			r, _ := containerd.ParseRelease(rel)
			kata := containerd.Runtime{Name: "kata-qemu-nvidia-gpu", Type: "io.containerd.kata-qemu-nvidia-gpu.v2", ConfigPath: "/ours/c.toml"}
			e := containerd.NewEditor(main, containerd.DefaultDropInPath)
			if _, err := e.Apply(containerd.Settings{Runtimes: []containerd.Runtime{kata}, Release: r, Replace: true}); err != nil {
				t.Fatal(err)
			}
			plugins, err := dump(t, rel, main, nil)
			if err != nil {
				t.Fatal(err)
			}
			got, _ := runtimesOf(criOf(plugins, rel))[kata.Name].(map[string]any)
			if opts, _ := got["options"].(map[string]any); opts["ConfigPath"] != kata.ConfigPath {
				t.Errorf("containerd %s serves %v", rel, got)
			}
		})
	}
}
