package vfio

import (
	"fmt"
	"slices"
	"strings"
)

// Member is a function a Plan gives to VFIO, with the reason it is there.
type Member struct {
	*Device
	Role Role
}

// Group is one IOMMU group of a Plan: VFIO takes whole groups.
type Group struct {
	// ID is the IOMMU group number, -1 for devices without one.
	ID int
	// Members are the endpoint functions to bind, sorted by address.
	Members []Member
	// Bridges share the group but stay with their host driver.
	Bridges []*Device
	// Err is set when the group cannot be given to VFIO (ErrGroupNotViable,
	// ErrNoIOMMU); nothing in such a group is touched.
	Err error
}

// Plan is the set of IOMMU groups that selected devices live in.
type Plan struct {
	Groups []*Group
}

// Members lists every member of every group, sorted by address.
func (p *Plan) Members() []Member {
	var ms []Member
	for _, g := range p.Groups {
		ms = append(ms, g.Members...)
	}
	slices.SortFunc(ms, func(a, b Member) int { return strings.Compare(a.Address, b.Address) })
	return ms
}

// NewPlan selects the devices at addresses and gathers their IOMMU groups.
// Each must exist (ErrDeviceNotFound) and match sel (ErrNotSelected). No
// addresses (nil or empty) make an empty plan; NewPlanAll plans every
// device sel selects.
//
// The other endpoint functions of a selected device's group come along as
// companions when they are functions of the same card (same slot), have no
// driver, or are held by a vfio driver already. One that is bound to another
// host driver makes the group not viable: the group's Err names both devices.
func NewPlan(devices []*Device, sel Selector, addresses []string) (*Plan, error) {
	return newPlan(devices, sel, addresses, false)
}

// NewPlanAll is NewPlan for every device among devices that sel selects.
func NewPlanAll(devices []*Device, sel Selector) (*Plan, error) {
	return newPlan(devices, sel, nil, true)
}

func newPlan(devices []*Device, sel Selector, addresses []string, all bool) (*Plan, error) {
	byAddr := make(map[string]*Device, len(devices))
	for _, d := range devices {
		byAddr[d.Address] = d
	}
	selected := map[string]Role{}
	if !all {
		for _, a := range addresses {
			addr, err := ParseAddress(a)
			if err != nil {
				return nil, err
			}
			d, ok := byAddr[addr]
			if !ok {
				return nil, fmt.Errorf("select %s: %w", addr, ErrDeviceNotFound)
			}
			role, ok := sel.Match(d)
			if !ok {
				return nil, fmt.Errorf("select %s (%04x:%04x, class 0x%06x): %w %q; name its ids with --select to handle it",
					addr, d.Vendor, d.DeviceID, d.Class, ErrNotSelected, sel.String())
			}
			selected[addr] = role
		}
	} else {
		for _, d := range devices {
			if role, ok := sel.Match(d); ok {
				selected[d.Address] = role
			}
		}
	}

	groups := map[int]*Group{}
	var ungrouped []*Group
	for _, d := range devices {
		role, ok := selected[d.Address]
		if !ok {
			continue
		}
		if d.IOMMUGroup < 0 {
			ungrouped = append(ungrouped, &Group{ID: -1, Members: []Member{{d, role}},
				Err: fmt.Errorf("bind %s: %w", d.Address, ErrNoIOMMU)})
			continue
		}
		if groups[d.IOMMUGroup] == nil {
			groups[d.IOMMUGroup] = &Group{ID: d.IOMMUGroup}
		}
	}

	for _, g := range groups {
		for _, d := range devices {
			if _, ok := selected[d.Address]; ok && d.IOMMUGroup == g.ID && d.NumVFs > 0 && g.Err == nil {
				g.Err = fmt.Errorf("%w: %s has %d virtual functions enabled, and vfio-pci cannot take a physical function that has them; disable them first (echo 0 > /sys/bus/pci/devices/%s/sriov_numvfs) or select the VFs by their device id",
					ErrVFsEnabled, d.Address, d.NumVFs, d.Address)
			}
		}
		selectedSlots := map[string]string{}
		var first string // the group's first selected device, named in errors
		for _, d := range devices {
			if _, ok := selected[d.Address]; ok && d.IOMMUGroup == g.ID {
				selectedSlots[slot(d.Address)] = d.Address
				if first == "" {
					first = d.Address
				}
			}
		}
		for _, d := range devices {
			if d.IOMMUGroup != g.ID {
				continue
			}
			if role, ok := selected[d.Address]; ok {
				g.Members = append(g.Members, Member{d, role})
				continue
			}
			switch {
			case d.IsBridge():
				g.Bridges = append(g.Bridges, d)
			case selectedSlots[slot(d.Address)] != "", d.Driver == "", d.BoundToVFIO():
				g.Members = append(g.Members, Member{d, RoleCompanion})
			case g.Err == nil:
				g.Err = fmt.Errorf("%w: iommu group %d: %s shares it with %s (%04x:%04x), which is bound to host driver %q and was not selected; select it too or unbind it first",
					ErrGroupNotViable, g.ID, first, d.Address, d.Vendor, d.DeviceID, d.Driver)
			}
		}
	}

	p := &Plan{}
	for _, g := range groups {
		p.Groups = append(p.Groups, g)
	}
	p.Groups = append(p.Groups, ungrouped...)
	slices.SortFunc(p.Groups, func(a, b *Group) int {
		return strings.Compare(a.Members[0].Address, b.Members[0].Address)
	})
	return p, nil
}
