package vfio_test

import (
	"errors"
	"testing"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
)

func TestParseAddress(t *testing.T) {
	for _, tc := range []struct {
		in, want string
	}{
		{"0000:65:00.0", "0000:65:00.0"},
		{"65:00.0", "0000:65:00.0"},         // lspci's short form
		{"0000:DB:00.1", "0000:db:00.1"},    // upper-case hex from other tools
		{" 0001:3a:1f.7\n", "0001:3a:1f.7"}, // pasted with white space
		{"10000:00:02.0", "10000:00:02.0"},  // VMD domains have five digits
	} {
		got, err := vfio.ParseAddress(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("ParseAddress(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
	for _, bad := range []string{"", "65:00", "0000:65:20.0", "0000:65:00.8", "gg:00.0", "0000:65:00.0/..", "../0000:65:00.0"} {
		if _, err := vfio.ParseAddress(bad); !errors.Is(err, vfio.ErrInvalidAddress) {
			t.Errorf("ParseAddress(%q) error = %v; want ErrInvalidAddress", bad, err)
		}
	}
}

func TestSelector(t *testing.T) {
	gpu := &vfio.Device{Vendor: 0x10de, DeviceID: 0x2330, Class: 0x030200}
	vga := &vfio.Device{Vendor: 0x10de, DeviceID: 0x1eb8, Class: 0x030000}
	audio := &vfio.Device{Vendor: 0x10de, DeviceID: 0x1aef, Class: 0x040300}
	nvswitch := &vfio.Device{Vendor: 0x10de, DeviceID: 0x22a3, Class: 0x068000}
	edu := &vfio.Device{Vendor: 0x1234, DeviceID: 0x11e8, Class: 0x00ff00}
	bridge := &vfio.Device{Vendor: 0x1b36, DeviceID: 0x0001, Class: 0x060400}
	for _, tc := range []struct {
		list       string
		nvswitches bool
		dev        *vfio.Device
		role       vfio.Role
	}{
		{"", false, gpu, vfio.RoleGPU},
		{"", false, vga, vfio.RoleGPU},
		{"", false, audio, ""}, // the card's other functions come along as companions, not selected
		{"", false, nvswitch, ""},
		{"", true, nvswitch, vfio.RoleNVSwitch},
		{"10de", false, edu, ""},
		{"1234:11e8", false, edu, vfio.RoleGPU}, // explicit ids match whatever the class
		{"1234", false, edu, vfio.RoleGPU},
		{"10de:22a3", false, nvswitch, vfio.RoleNVSwitch},
		{"1234:11e9", false, edu, ""},
		{"1b36", false, bridge, ""}, // bridges stay with the host
		{"10de, 1234:11E8", false, edu, vfio.RoleGPU},
	} {
		sel, err := vfio.ParseSelector(tc.list, tc.nvswitches)
		if err != nil {
			t.Fatalf("ParseSelector(%q): %v", tc.list, err)
		}
		role, ok := sel.Match(tc.dev)
		if role != tc.role || ok != (tc.role != "") {
			t.Errorf("selector %q (nvswitches %v) on %04x:%04x = %q, %v; want %q", tc.list, tc.nvswitches,
				tc.dev.Vendor, tc.dev.DeviceID, role, ok, tc.role)
		}
	}
	for _, bad := range []string{"xyz", "10de:", "12345", ":11e8", "10de,,1234"} {
		if _, err := vfio.ParseSelector(bad, false); !errors.Is(err, vfio.ErrInvalidSelector) {
			t.Errorf("ParseSelector(%q) error = %v; want ErrInvalidSelector", bad, err)
		}
	}
}
