// Command discover prints, as JSON, the passthrough devices that package
// vfio finds the way the device plugin does: for checking discovery against
// a real kernel inside a test VM.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
)

type device struct {
	ID        string   `json:"id"`
	Group     int      `json:"group"`
	NUMA      int      `json:"numa"`
	Functions []string `json:"functions"`
	CDevs     []string `json:"cdevs"`
	Ready     bool     `json:"ready"`
}

func main() {
	sysfs := flag.String("sysfs-root", vfio.DefaultSysfsRoot, "sysfs")
	sel := flag.String("select", vfio.DefaultSelect, "vendor[:device] list")
	flag.Parse()
	s, err := vfio.ParseSelector(*sel, true)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	devices, err := vfio.NewSysfs(*sysfs).Devices()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
	}
	out := []device{}
	for _, p := range vfio.FindPassthrough(devices, s) {
		d := device{ID: p.ID, Group: p.IOMMUGroup, NUMA: p.NUMANode(), Ready: p.Ready(), CDevs: []string{}}
		for _, f := range p.Functions {
			d.Functions = append(d.Functions, f.Address)
			if f.VFIODevice != "" {
				d.CDevs = append(d.CDevs, f.VFIODevice)
			}
		}
		out = append(out, d)
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
