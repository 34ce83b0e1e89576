package e2e

import (
	"strings"
	"testing"
)

func TestSandboxDevicePluginUsageErrors(t *testing.T) {
	dir := t.TempDir()
	base := []string{"--device-plugin-path", dir, "--sysfs-root", dir, "--dev-root", dir, "--cdi-root", dir}
	for _, tc := range []struct {
		name string
		env  []string
		args []string
		want string
	}{
		{"bad mode", nil, []string{"--vfio-mode", "vfio"}, "--vfio-mode"},
		{"bad alias", []string{"P_GPU_ALIAS=my gpu"}, nil, "P_GPU_ALIAS"},
		{"bad selector", []string{"VFIO_SELECT=nvidia"}, nil, "invalid selector"},
		{"stray argument", nil, []string{"serve"}, "unexpected arguments"},
		{"bad log level", nil, []string{"--log-level", "loud"}, "--log-level"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := run(t, "sandbox-device-plugin", tc.env, append(base, tc.args...)...)
			if r.code != 2 || !strings.Contains(r.stderr, tc.want) {
				t.Errorf("want exit 2 mentioning %q; got %s", tc.want, r)
			}
		})
	}
	r := run(t, "sandbox-device-plugin", nil, "--help")
	for _, s := range []string{"P_GPU_ALIAS", "NVSWITCH_ALIAS", "DEVICE_PLUGIN_PATH", "--vfio-mode", "--health-address"} {
		if r.code != 0 || !strings.Contains(r.stdout, s) {
			t.Errorf("--help lacks %s: %s", s, r)
		}
	}
}
