package vfio_test

import (
	"testing"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
)

// No addresses plan nothing, whether nil or empty; every selected device is
// NewPlanAll, said out loud.
func TestPlanAllIsExplicit(t *testing.T) {
	tree, _ := vfiotest.New(t, vfiotest.HGXH100())
	devices, err := vfio.NewSysfs(tree.SysfsRoot).Devices()
	if err != nil {
		t.Fatal(err)
	}
	sel, err := vfio.ParseSelector("", false)
	if err != nil {
		t.Fatal(err)
	}
	for _, addresses := range [][]string{nil, {}} {
		p, err := vfio.NewPlan(devices, sel, addresses)
		if err != nil || len(p.Members()) != 0 {
			t.Errorf("NewPlan(%#v) = %d members, %v; want none", addresses, len(p.Members()), err)
		}
	}
	p, err := vfio.NewPlanAll(devices, sel)
	if err != nil || len(p.Members()) != len(vfiotest.HGXH100GPUs) {
		t.Errorf("NewPlanAll = %d members, %v; want the %d GPUs", len(p.Members()), err, len(vfiotest.HGXH100GPUs))
	}
}
