package katamanager

import (
	"strings"
	"testing"

	"github.com/gpu-sandbox/gpu-sandbox/internal/cli"
)

// The configuration as the GPU Operator writes it must be accepted as is.
func TestParseOperatorConfig(t *testing.T) {
	c, err := ParseConfig([]byte(`artifactsDir: /opt/nvidia-gpu-operator/artifacts/runtimeclasses
runtimeClasses:
- name: kata-qemu-nvidia-gpu
  nodeSelector: {}
  artifacts:
    url: nvcr.io/nvidia/cloud-native/kata-gpu-artifacts:ubuntu22.04-525
    pullSecret: ""
- name: kata-qemu-nvidia-gpu-snp
  nodeSelector:
    nvidia.com/cc.capable: "true"
  artifacts:
    url: nvcr.io/nvidia/cloud-native/kata-gpu-artifacts:ubuntu22.04-525-snp
    pullSecret: ngc-secret
    platform: linux/amd64
`), "test")
	if err != nil {
		t.Fatal(err)
	}
	if len(c.RuntimeClasses) != 2 || c.RuntimeClasses[1].Artifacts.PullSecret != "ngc-secret" ||
		c.RuntimeClasses[1].NodeSelector["nvidia.com/cc.capable"] != "true" {
		t.Errorf("parsed %+v", c)
	}
}

func TestParseConfigErrors(t *testing.T) {
	for _, tc := range []struct{ yaml, want string }{
		{"artifactsDir: /a\nruntimeClasses:\n- name: x\n  artifacts:\n    url: r/x:1\n    pullsecret: s\n", `unknown field "runtimeClasses[0].artifacts.pullsecret"`},
		{"artifactsDir: /a\nartifactsDir: /b\n", "already set"},
		{"runtimeClasses:\n- name: x\n  artifacts:\n    url: r/x:1\n    pullSecret: Not_A_Name\n", "pullSecret"},
		{"runtimeClasses:\n- name: x\n  artifacts:\n    url: \"nvcr.io/x:bad tag\"\n", "runtimeClasses[0].artifacts.url"},
		{"runtimeClasses: 3\n", "config file"},
	} {
		_, err := ParseConfig([]byte(tc.yaml), "test")
		if cli.ExitCode(err) != cli.ExitUsage || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v; want a usage error naming %q", tc.yaml, err, tc.want)
		}
	}
}
