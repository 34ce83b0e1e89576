package sandboxplugin

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"
	specs "tags.cncf.io/container-device-interface/specs-go"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/cdi"
)

// Uninstall removes the passthrough CDI specs from the CDI root: the
// nvidia.com specs whose every device node is a VFIO node (ours, and the
// nvidia.com/pgpu spec NVIDIA's kata-manager wrote). Specs of the NVIDIA
// container toolkit, which name /dev/nvidia* nodes, stay. It is what an
// administrator runs after giving the node's GPUs back.
func Uninstall(cfg Config) error {
	w, err := cdi.NewWriter(cfg.CDIRoot)
	if err != nil {
		return err
	}
	files, err := filepath.Glob(filepath.Join(cfg.CDIRoot, cdi.Vendor+"-*.yaml"))
	if err != nil {
		return err
	}
	var errs []error
	for _, f := range files {
		spec, err := cdiapi.ReadSpec(f, 0)
		if err != nil {
			cfg.Log.WithError(err).WithField("path", f).Warn("not a CDI spec; left alone")
			continue
		}
		if !passthroughOnly(spec.Spec) {
			continue
		}
		if err := w.Remove(spec.Kind); err != nil {
			errs = append(errs, err)
			continue
		}
		cfg.Log.WithFields(map[string]any{"kind": spec.Kind, "path": f}).Info("CDI spec removed")
	}
	if len(errs) > 0 {
		return fmt.Errorf("uninstall: %w", errors.Join(errs...))
	}
	return nil
}

// passthroughOnly reports whether every device node the spec names is a
// VFIO or IOMMU node.
func passthroughOnly(s *specs.Spec) bool {
	edits := []specs.ContainerEdits{s.ContainerEdits}
	for _, d := range s.Devices {
		edits = append(edits, d.ContainerEdits)
	}
	n := 0
	for _, e := range edits {
		for _, node := range e.DeviceNodes {
			if !strings.HasPrefix(node.Path, "/dev/vfio/") && node.Path != "/dev/iommu" {
				return false
			}
			n++
		}
	}
	return n > 0
}
