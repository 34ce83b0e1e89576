package kata_test

import (
	"errors"
	"regexp"
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
	out, err := kata.Rewrite([]byte(config), "/opt/artifacts/kata-qemu-nvidia-gpu", files)
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
	_, err := kata.Rewrite([]byte("[hypervisor.qemu]\nimage = \"/x/kata.img\"\n"), "/d", files)
	if !errors.Is(err, kata.ErrMissingFile) || !strings.Contains(err.Error(), "image") || !strings.Contains(err.Error(), "[hypervisor.qemu]") {
		t.Errorf("missing image: %v", err)
	}
	_, err = kata.Rewrite([]byte("[hypervisor.qemu]\nkernel = \"/x/vmlinux\"\n"), "/d", []string{"vmlinux-a", "vmlinuz-b"})
	if !errors.Is(err, kata.ErrMissingFile) || !strings.Contains(err.Error(), "several") {
		t.Errorf("two kernels: %v", err)
	}
	if _, err := kata.Rewrite([]byte("[runtime]\nkernel = \"x\"\n"), "/d", files); !errors.Is(err, kata.ErrNothingToRewrite) {
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

var assetKey = regexp.MustCompile(`^\s*(kernel|image|initrd)\s*=`)
