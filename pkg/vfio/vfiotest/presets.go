package vfiotest

import "fmt"

// Ids and classes the presets use.
const (
	VendorNVIDIA   = 0x10de
	DeviceH100SXM  = 0x2330 // GH100 [H100 SXM5 80GB]
	DeviceNVSwitch = 0x22a3 // GH100 [H100 NVSwitch]
	DeviceA10      = 0x2236 // GA102GL [A10]
	DeviceA10Audio = 0x1aef // GA102 High Definition Audio Controller

	Class3D       = 0x030200
	ClassVGA      = 0x030000
	ClassNVSwitch = 0x068000
	ClassAudio    = 0x040300
	ClassEthernet = 0x020000
	ClassBridge   = 0x060400
)

// HGXH100GPUs and HGXH100NVSwitches are the addresses HGXH100 uses.
var (
	HGXH100GPUs = []string{
		"0000:18:00.0", "0000:2a:00.0", "0000:3a:00.0", "0000:5d:00.0",
		"0000:9a:00.0", "0000:ab:00.0", "0000:ba:00.0", "0000:db:00.0",
	}
	HGXH100NVSwitches = []string{"0000:05:00.0", "0000:06:00.0", "0000:07:00.0", "0000:08:00.0"}
)

// HGXH100 is an 8-GPU HGX H100 board: each GPU behind its own PCIe switch
// port in its own IOMMU group, four on NUMA node 0 and four on node 1, four
// NVSwitches on node 0. Everything starts on the nvidia driver; vfio-pci is
// loaded.
func HGXH100() Node {
	n := Node{Drivers: []string{"vfio-pci"}}
	for i, addr := range HGXH100GPUs {
		numa := i / 4
		port := fmt.Sprintf("0000:%s:00.0", busBefore(addr))
		n.Devices = append(n.Devices,
			Device{Address: port, Vendor: 0x1000, DeviceID: 0xc030, Class: ClassBridge,
				Driver: "pcieport", IOMMUGroup: 100 + i, NUMANode: numa},
			Device{Address: addr, Vendor: VendorNVIDIA, DeviceID: DeviceH100SXM, Class: Class3D,
				SubsystemVendor: VendorNVIDIA, SubsystemDevice: 0x16c1,
				Driver: "nvidia", IOMMUGroup: 20 + i, NUMANode: numa, Parent: port})
	}
	for i, addr := range HGXH100NVSwitches {
		n.Devices = append(n.Devices, Device{Address: addr, Vendor: VendorNVIDIA, DeviceID: DeviceNVSwitch,
			Class: ClassNVSwitch, SubsystemVendor: VendorNVIDIA, SubsystemDevice: 0x1796,
			Driver: "nvidia", IOMMUGroup: 40 + i, NUMANode: 0})
	}
	return n
}

// busBefore names the bus of the switch port above a GPU: one below the
// GPU's own, as firmware numbers them.
func busBefore(addr string) string {
	var bus int
	fmt.Sscanf(addr[5:7], "%x", &bus)
	return fmt.Sprintf("%02x", bus-1)
}

// A10WithAudio is one A10 whose HD audio function shares its IOMMU group and
// is held by snd_hda_intel, as on a workstation board.
func A10WithAudio() Node {
	return Node{
		Drivers: []string{"vfio-pci"},
		Devices: []Device{
			{Address: "0000:65:00.0", Vendor: VendorNVIDIA, DeviceID: DeviceA10, Class: Class3D,
				SubsystemVendor: VendorNVIDIA, SubsystemDevice: 0x1482, Driver: "nvidia", IOMMUGroup: 21, NUMANode: 0},
			{Address: "0000:65:00.1", Vendor: VendorNVIDIA, DeviceID: DeviceA10Audio, Class: ClassAudio,
				SubsystemVendor: VendorNVIDIA, SubsystemDevice: 0x1482, Driver: "snd_hda_intel", IOMMUGroup: 21, NUMANode: 0},
		},
	}
}

// GroupWithNIC has two A10s: 0000:17:00.0 shares group 30 with an Intel X710
// NIC (0000:18:00.0, on i40e) behind a switch without ACS, and 0000:65:00.0
// is alone in group 31.
func GroupWithNIC() Node {
	return Node{
		Drivers: []string{"vfio-pci"},
		Devices: []Device{
			{Address: "0000:17:00.0", Vendor: VendorNVIDIA, DeviceID: DeviceA10, Class: Class3D,
				SubsystemVendor: VendorNVIDIA, SubsystemDevice: 0x1482, Driver: "nvidia", IOMMUGroup: 30, NUMANode: 0},
			{Address: "0000:18:00.0", Vendor: 0x8086, DeviceID: 0x1572, Class: ClassEthernet,
				SubsystemVendor: 0x8086, SubsystemDevice: 0x0001, Driver: "i40e", IOMMUGroup: 30, NUMANode: 0},
			{Address: "0000:65:00.0", Vendor: VendorNVIDIA, DeviceID: DeviceA10, Class: Class3D,
				SubsystemVendor: VendorNVIDIA, SubsystemDevice: 0x1482, Driver: "nvidia", IOMMUGroup: 31, NUMANode: 0},
		},
	}
}

// NoIOMMU is A10WithAudio on a kernel booted without an IOMMU.
func NoIOMMU() Node {
	n := A10WithAudio()
	n.NoIOMMU = true
	return n
}

// BoundToVFIO returns n with every NVIDIA function, and every function that
// shares a group with one, already held by vfio-pci when the tree is built,
// as vfio-manager leaves a node. Their native drivers stay as they were.
func BoundToVFIO(n Node) Node {
	groups := map[int]bool{}
	for _, d := range n.Devices {
		if d.Vendor == VendorNVIDIA && d.Class>>8 != ClassBridge>>8 {
			groups[d.IOMMUGroup] = true
		}
	}
	out := n
	out.Devices = append([]Device(nil), n.Devices...)
	for i, d := range out.Devices {
		if groups[d.IOMMUGroup] && d.Class>>8 != ClassBridge>>8 {
			if d.NativeDriver == "" {
				out.Devices[i].NativeDriver = d.Driver
			}
			out.Devices[i].Driver = "vfio-pci"
		}
	}
	out.Drivers = append(append([]string(nil), n.Drivers...), "vfio-pci")
	return out
}

// DeviceL40S is the AD102GL [L40S].
const DeviceL40S = 0x26b9

// TwoSocketL40SGPUs are the addresses TwoSocketL40S uses, in order.
var TwoSocketL40SGPUs = []string{
	"0000:1b:00.0", "0000:1c:00.0", "0000:3d:00.0", "0000:3e:00.0",
	"0000:9d:00.0", "0000:9e:00.0", "0000:bd:00.0", "0000:be:00.0",
}

// TwoSocketL40S is a two-socket 4U server with eight L40S: on each socket
// two PCIe switches, each with two GPUs on its downstream ports (the layout
// of Supermicro's and Dell's eight-GPU PCIe servers), every GPU alone in its
// IOMMU group. Everything starts on the nvidia driver; vfio-pci is loaded.
func TwoSocketL40S() Node {
	n := Node{Drivers: []string{"vfio-pci"}}
	group := 60
	for sw := 0; sw < 4; sw++ {
		first := TwoSocketL40SGPUs[2*sw]
		var bus int
		fmt.Sscanf(first[5:7], "%x", &bus)
		// Upstream port two buses above the first GPU, a downstream port per GPU.
		up := fmt.Sprintf("0000:%02x:00.0", bus-2)
		numa := sw / 2
		n.Devices = append(n.Devices, Device{Address: up, Vendor: 0x1000, DeviceID: 0xc030, Class: ClassBridge,
			Driver: "pcieport", IOMMUGroup: group, NUMANode: numa})
		group++
		for i := 0; i < 2; i++ {
			addr := TwoSocketL40SGPUs[2*sw+i]
			down := fmt.Sprintf("0000:%02x:%02x.0", bus-1, i)
			n.Devices = append(n.Devices,
				Device{Address: down, Vendor: 0x1000, DeviceID: 0xc030, Class: ClassBridge,
					Driver: "pcieport", IOMMUGroup: group, NUMANode: numa, Parent: up},
				Device{Address: addr, Vendor: VendorNVIDIA, DeviceID: DeviceL40S, Class: Class3D,
					SubsystemVendor: VendorNVIDIA, SubsystemDevice: 0x1851,
					Driver: "nvidia", IOMMUGroup: group + 1, NUMANode: numa, Parent: down})
			group += 2
		}
	}
	return n
}

// TwoSocketL40SNoACS is TwoSocketL40S with ACS off in its PCIe switches (as
// some firmware ships them): the IOMMU cannot tell a switch's downstream
// ports apart, so each switch's two GPUs, with those ports, share one group
// (80 to 83): eight GPUs in four groups.
func TwoSocketL40SNoACS() Node {
	n := TwoSocketL40S()
	parent := map[string]string{}
	for _, d := range n.Devices {
		parent[d.Address] = d.Parent
	}
	group := map[string]int{} // switch upstream port → shared group
	for i, d := range n.Devices {
		up := ""
		switch {
		case d.Vendor == VendorNVIDIA:
			up = parent[d.Parent]
		case d.Parent != "":
			up = d.Parent // a downstream port
		default:
			continue
		}
		if _, ok := group[up]; !ok {
			group[up] = 80 + len(group)
		}
		n.Devices[i].IOMMUGroup = group[up]
	}
	return n
}
