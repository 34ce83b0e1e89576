package kata_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/kata"
)

const config = `# Copyright (c) 2017-2019 Intel Corporation
[hypervisor.qemu]
path = "/opt/kata/bin/qemu-system-x86_64"
kernel = "/opt/kata/share/kata-containers/vmlinuz-6.1.62-nvidia-gpu"   # the guest kernel
initrd = '/opt/kata/share/kata-containers/kata-containers-initrd.img'
# image = "/opt/kata/share/kata-containers/kata-containers.img"
machine_type = "q35"
	kernel_params = "kernel=ignored"

[agent.kata]
kernel = "/not/a/hypervisor/key"

[hypervisor.qemu-snp]
kernel = "/elsewhere/vmlinuz.container"
`

var files = []string{"configuration-nvidia-gpu-qemu.toml", "vmlinuz-6.1.62-nvidia-gpu", "kata-ubuntu-jammy-nvidia-gpu.initrd"}

func TestRewrite(t *testing.T) {
	out, err := kata.Rewrite([]byte(config), "/opt/artifacts/kata-qemu-nvidia-gpu", files, kata.Options{})
	if err != nil {
		t.Fatal(err)
	}
	want := strings.NewReplacer(
		`kernel = "/opt/kata/share/kata-containers/vmlinuz-6.1.62-nvidia-gpu"   # the guest kernel`,
		`kernel = "/opt/artifacts/kata-qemu-nvidia-gpu/vmlinuz-6.1.62-nvidia-gpu"   # the guest kernel`,
		`initrd = '/opt/kata/share/kata-containers/kata-containers-initrd.img'`,
		`initrd = "/opt/artifacts/kata-qemu-nvidia-gpu/kata-ubuntu-jammy-nvidia-gpu.initrd"`,
		`kernel = "/elsewhere/vmlinuz.container"`,
		`kernel = "/opt/artifacts/kata-qemu-nvidia-gpu/vmlinuz-6.1.62-nvidia-gpu"`,
	).Replace(config)
	if string(out) != want {
		t.Errorf("got:\n%s\nwant:\n%s", out, want)
	}
}

func TestRewriteErrors(t *testing.T) {
	_, err := kata.Rewrite([]byte("[hypervisor.qemu]\nimage = \"/x/kata.img\"\n"), "/d", files, kata.Options{})
	if !errors.Is(err, kata.ErrMissingFile) || !strings.Contains(err.Error(), "image") || !strings.Contains(err.Error(), "[hypervisor.qemu]") {
		t.Errorf("missing image: %v", err)
	}
	_, err = kata.Rewrite([]byte("[hypervisor.qemu]\nkernel = \"/x/kernel.bin\"\n"), "/d", []string{"vmlinux-a", "vmlinuz-b"}, kata.Options{})
	if !errors.Is(err, kata.ErrMissingFile) || !strings.Contains(err.Error(), "several") || !strings.Contains(err.Error(), "vmlinux-a, vmlinuz-b") {
		t.Errorf("two kernels: %v", err)
	}
	_, err = kata.Rewrite([]byte(runtimeRS), "/d", []string{"vmlinux-6.12.47-166-nvidia-gpu", "kata-ubuntu-noble-nvidia.image"}, kata.Options{})
	if !errors.Is(err, kata.ErrMissingFile) || !strings.Contains(err.Error(), "guest_extension_images") {
		t.Errorf("extension image missing: %v", err)
	}
	if _, err := kata.Rewrite([]byte("[runtime]\nkernel = \"x\"\n"), "/d", files, kata.Options{}); !errors.Is(err, kata.ErrNothingToRewrite) {
		t.Errorf("nothing to rewrite: %v", err)
	}
}

func TestConfigFor(t *testing.T) {
	both := []string{"configuration-qemu-nvidia-gpu.toml", "configuration-qemu-nvidia-gpu-snp.toml", "vmlinuz"}
	for _, tc := range []struct {
		class string
		files []string
		want  string
	}{
		{"kata-qemu-nvidia-gpu", both, "configuration-qemu-nvidia-gpu.toml"},
		{"kata-qemu-nvidia-gpu-snp", both, "configuration-qemu-nvidia-gpu-snp.toml"},
		{"kata-qemu-nvidia-gpu", files, "configuration-nvidia-gpu-qemu.toml"},
		{"my-own-class", files, "configuration-nvidia-gpu-qemu.toml"}, // the only one
	} {
		if got, err := kata.ConfigFor(tc.class, tc.files); got != tc.want || err != nil {
			t.Errorf("ConfigFor(%s) = %q, %v; want %q", tc.class, got, err, tc.want)
		}
	}
	for _, tc := range []struct {
		class string
		files []string
	}{
		{"kata-qemu-nvidia-gpu-tdx", both},
		{"kata-qemu", []string{"vmlinuz", "x.initrd"}},
	} {
		if _, err := kata.ConfigFor(tc.class, tc.files); !errors.Is(err, kata.ErrNoConfig) {
			t.Errorf("ConfigFor(%s, %v): %v; want ErrNoConfig", tc.class, tc.files, err)
		}
	}
}

// runtime-rs's NVIDIA configuration: the driver stack is a guest extension
// image in an array of tables after [runtime]; the firmware is the host's.
const runtimeRS = `[hypervisor.qemu]
path = "/opt/kata/bin/qemu-system-x86_64"
kernel = "/opt/kata/share/kata-containers/vmlinux-nvidia-gpu.container"
image = "/opt/kata/share/kata-containers/kata-containers-nvidia.img"
firmware = "/usr/share/ovmf/OVMF.fd"
rootfs_type = "erofs"
cold_plug_vfio = "root-port"

[runtime]
enable_debug = false

[[hypervisor.qemu.guest_extension_images]]
name = "gpu"
path = "/opt/kata/share/kata-containers/kata-containers-nvidia-gpu-extension.img"
verity_params = "root_hash=abc"
`

var versioned = []string{
	"configuration-qemu-nvidia-gpu-runtime-rs.toml", "vmlinux-6.12.47-166-nvidia-gpu",
	"kata-ubuntu-noble-nvidia.image", "kata-ubuntu-noble-nvidia-gpu-extension-580.95.05.image",
	"kata-ubuntu-noble-nvidia-gpu-confidential-extension-580.95.05.image",
}

func TestRewriteRuntimeRS(t *testing.T) {
	out, err := kata.Rewrite([]byte(runtimeRS), "/a", versioned, kata.Options{RuntimeClass: "kata-qemu-nvidia-gpu"})
	if err != nil {
		t.Fatal(err)
	}
	want := strings.NewReplacer(
		`"/opt/kata/share/kata-containers/vmlinux-nvidia-gpu.container"`, `"/a/vmlinux-6.12.47-166-nvidia-gpu"`,
		`"/opt/kata/share/kata-containers/kata-containers-nvidia.img"`, `"/a/kata-ubuntu-noble-nvidia.image"`,
		`"/opt/kata/share/kata-containers/kata-containers-nvidia-gpu-extension.img"`, `"/a/kata-ubuntu-noble-nvidia-gpu-extension-580.95.05.image"`,
	).Replace(runtimeRS)
	if string(out) != want {
		t.Errorf("got:\n%s\nwant:\n%s", out, want)
	}
	// The confidential runtime class takes the confidential extension.
	out, err = kata.Rewrite([]byte(runtimeRS), "/a", versioned, kata.Options{RuntimeClass: "kata-qemu-nvidia-gpu-snp"})
	if err != nil || !strings.Contains(string(out), "/a/kata-ubuntu-noble-nvidia-gpu-confidential-extension-580.95.05.image") {
		t.Errorf("snp: %v\n%s", err, out)
	}
	// A firmware the artifact ships is its own.
	out, err = kata.Rewrite([]byte(runtimeRS), "/a", append(versioned, "OVMF.fd"), kata.Options{})
	if err != nil || !strings.Contains(string(out), `firmware = "/a/OVMF.fd"`) {
		t.Errorf("shipped firmware: %v\n%s", err, out)
	}
}

// Keys are found as TOML means them: dotted keys under a parent table,
// multi-line and literal strings, tables after arrays of tables.
func TestRewriteTOMLForms(t *testing.T) {
	in := "[hypervisor]\nqemu.kernel = '/old/vmlinuz'\n[hypervisor.clh]\ninitrd = \"\"\"\n/old/kata-containers-initrd.img\"\"\"\n# kernel = \"/commented\"\n"
	out, err := kata.Rewrite([]byte(in), "/a", files, kata.Options{})
	if err != nil {
		t.Fatal(err)
	}
	want := "[hypervisor]\nqemu.kernel = \"/a/vmlinuz-6.1.62-nvidia-gpu\"\n[hypervisor.clh]\ninitrd = \"/a/kata-ubuntu-jammy-nvidia-gpu.initrd\"\n# kernel = \"/commented\"\n"
	if string(out) != want {
		t.Errorf("got:\n%s\nwant:\n%s", out, want)
	}
	if _, err := kata.Rewrite([]byte("[hypervisor.qemu\nkernel = 1\n"), "/a", files, kata.Options{}); !errors.Is(err, kata.ErrInvalidConfig) {
		t.Errorf("not TOML: %v", err)
	}
}
