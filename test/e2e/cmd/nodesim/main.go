// Command nodesim plays, inside a test VM, the parts of a node that sit
// between the agents and a VMM, so that what the agents hand out is all a
// VMM gets:
//
//	nodesim allocate --plugin-dir DIR --resource NAME --cdi-root DIR --pods DIR ID...
//
// is the kubelet (the stand-in of pkg/deviceplugin/deviceplugintest): it
// serves kubelet.sock in the plugin directory, waits for the resource's
// plugin to list every ID as healthy, and allocates each ID to a pod of its
// own, as the kubelet's device manager does. For each pod it then does what
// the container runtime does with the answer: under DIR/<ID>/devices it
// creates the /dev tree the Allocate answer's device specs describe (each
// container path a node with the numbers and mode of its host path), and
// under DIR/<ID>/cdi the /dev tree the CDI library resolves from the
// answer's CDI device names (the OCI edits the runtime applies). A VFIO
// user run with one of those trees mounted over /dev has nothing else.
// DIR/<ID>/cdi-names lists the answer's CDI names, one a line.
// It prints one line, "allocate " and a JSON object: the registration, the
// device list and every pod's answer and CDI device nodes.
//
//	nodesim coldplug --config FILE --cdi-root DIR [--dry-run] CDI-NAME...
//
// is Kata's runtime cold-plugging the pod's devices, as
// kata-qemu-nvidia-gpu is configured (cold_plug_vfio = "root-port"): it
// resolves the CDI names through the CDI library to VFIO group nodes, finds
// each group's endpoint functions in sysfs, and starts the configuration's
// QEMU with pcie_root_port root ports and each function on a root port of
// its own (-device vfio-pci,host=<address>,bus=rp<n>), on KVM where
// /dev/kvm opens and TCG otherwise. It prints "coldplug accel=..." and the
// command line, runs QEMU with its console on stdout, and prints "coldplug
// exit=<status> seconds=<wall time>".
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "allocate":
		err = allocate(os.Args[2:])
	case "coldplug":
		err = coldplug(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "nodesim:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: nodesim allocate --plugin-dir DIR --resource NAME --cdi-root DIR --pods DIR ID...\n"+
		"       nodesim coldplug --config FILE --cdi-root DIR [--dry-run] CDI-NAME...")
	os.Exit(2)
}
