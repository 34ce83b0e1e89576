package vfio

import (
	"fmt"
	"strconv"
	"strings"
)

// Role says why a device is part of a bind.
type Role string

// Roles of the devices a Plan holds.
const (
	RoleGPU       Role = "gpu"
	RoleNVSwitch  Role = "nvswitch"
	RoleCompanion Role = "companion" // an unselected function that shares the group
)

// DefaultSelect is the selector string used when none is given: NVIDIA GPUs.
const DefaultSelect = "10de"

// ID names a vendor, or a vendor and device, of PCI functions.
type ID struct {
	Vendor uint16
	Device uint16
	// AnyDevice matches every device of the vendor.
	AnyDevice bool
}

func (id ID) String() string {
	if id.AnyDevice {
		return fmt.Sprintf("%04x", id.Vendor)
	}
	return fmt.Sprintf("%04x:%04x", id.Vendor, id.Device)
}

// Selector chooses the devices to give to VFIO.
//
// An NVIDIA vendor entry ("10de") picks GPUs (VGA and 3D controller classes)
// and, with NVSwitches set, NVSwitches. Any other entry matches by ids alone,
// whatever the class, so that other accelerators and emulated test devices
// can be handled: "1234" every function of vendor 1234, "1234:11e8" that
// device only. Bridges are never selected, and SR-IOV virtual functions
// only by an entry naming their device id: a vGPU host's VFs belong to its
// vGPU manager unless an administrator says otherwise.
type Selector struct {
	IDs        []ID
	NVSwitches bool
}

// ParseSelector parses a comma-separated list of vendor[:device] hex ids such
// as "10de" or "10de,1234:11e8". An empty list means DefaultSelect.
func ParseSelector(list string, nvswitches bool) (Selector, error) {
	if strings.TrimSpace(list) == "" {
		list = DefaultSelect
	}
	sel := Selector{NVSwitches: nvswitches}
	for _, f := range strings.Split(list, ",") {
		f = strings.TrimSpace(f)
		vendor, device, hasDevice := strings.Cut(f, ":")
		v, err := parseID(vendor)
		if err != nil {
			return Selector{}, fmt.Errorf("%w: %q: vendor: %w", ErrInvalidSelector, f, err)
		}
		id := ID{Vendor: v, AnyDevice: !hasDevice}
		if hasDevice {
			if id.Device, err = parseID(device); err != nil {
				return Selector{}, fmt.Errorf("%w: %q: device: %w", ErrInvalidSelector, f, err)
			}
		}
		sel.IDs = append(sel.IDs, id)
	}
	return sel, nil
}

func parseID(s string) (uint16, error) {
	s = strings.TrimPrefix(strings.ToLower(s), "0x")
	if len(s) == 0 || len(s) > 4 {
		return 0, fmt.Errorf("want 1 to 4 hex digits, got %q", s)
	}
	v, err := strconv.ParseUint(s, 16, 16)
	if err != nil {
		return 0, fmt.Errorf("want hex digits, got %q", s)
	}
	return uint16(v), nil
}

// Match reports whether the selector picks d, and in which role.
func (s Selector) Match(d *Device) (Role, bool) {
	if d.IsBridge() {
		return "", false
	}
	role := RoleGPU
	if d.IsNVSwitch() {
		role = RoleNVSwitch
	}
	for _, id := range s.IDs {
		switch {
		case id.Vendor != d.Vendor:
		case !id.AnyDevice:
			if id.Device == d.DeviceID {
				return role, true
			}
		case d.IsVF():
		case id.Vendor != VendorNVIDIA:
			return role, true
		case d.IsGPU():
			return RoleGPU, true
		case d.IsNVSwitch() && s.NVSwitches:
			return RoleNVSwitch, true
		}
	}
	return "", false
}

func (s Selector) String() string {
	ids := make([]string, len(s.IDs))
	for i, id := range s.IDs {
		ids[i] = id.String()
	}
	return strings.Join(ids, ",")
}
