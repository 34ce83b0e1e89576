package sandboxplugin

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
)

// CheckpointFile is the kubelet's record of the devices it assigned to
// containers, in its device-plugin directory. It outlives the plugins:
// after NVIDIA's sandbox device plugin is replaced by ours, it still holds
// the pods' devices under NVIDIA's IDs (IOMMU group numbers, or vfioN on
// iommufd hosts), which the kubelet cannot match with ours (PCI addresses).
const CheckpointFile = "kubelet_internal_checkpoint"

// assignment is one device ID the kubelet assigned to a container.
type assignment struct {
	pod, container, resource, id string
}

func (a assignment) String() string {
	return fmt.Sprintf("pod %s container %s as %s=%s", a.pod, a.container, a.resource, a.id)
}

// readCheckpoint returns the kubelet's assignments. A missing file means
// none. The kubelet has written DeviceIDs as a list (before 1.20) and as a
// map from NUMA node to list since.
func readCheckpoint(path string) ([]assignment, error) {
	data, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("kubelet checkpoint %s: %w", path, err)
	}
	var cp struct {
		Data struct {
			PodDeviceEntries []struct {
				PodUID        string
				ContainerName string
				ResourceName  string
				DeviceIDs     json.RawMessage
			}
		}
	}
	if err := json.Unmarshal(data, &cp); err != nil {
		return nil, fmt.Errorf("kubelet checkpoint %s: %w", path, err)
	}
	var out []assignment
	for _, e := range cp.Data.PodDeviceEntries {
		var ids []string
		var perNUMA map[string][]string
		if err := json.Unmarshal(e.DeviceIDs, &perNUMA); err == nil {
			for _, l := range perNUMA {
				ids = append(ids, l...)
			}
		} else if err := json.Unmarshal(e.DeviceIDs, &ids); err != nil {
			return nil, fmt.Errorf("kubelet checkpoint %s: pod %s: DeviceIDs: %w", path, e.PodUID, err)
		}
		for _, id := range ids {
			out = append(out, assignment{pod: e.PodUID, container: e.ContainerName, resource: e.ResourceName, id: id})
		}
	}
	return out, nil
}

// foreign maps the devices that the checkpoint assigns under another ID
// scheme (NVIDIA's: an IOMMU group number, or a vfioN cdev) to the
// assignment, for the resources this plugin advertises. Our own IDs are
// left alone: the kubelet knows them.
func foreign(assigned []assignment, resources map[string]bool, found []*vfio.Passthrough) map[string]assignment {
	byName := map[string]string{} // group number or vfioN → device ID
	for _, p := range found {
		byName[strconv.Itoa(p.IOMMUGroup)] = p.ID
		for _, f := range p.Functions {
			if f.VFIODevice != "" {
				byName[f.VFIODevice] = p.ID
			}
		}
	}
	out := map[string]assignment{}
	for _, a := range assigned {
		if !resources[a.resource] || strings.Contains(a.id, ":") {
			continue
		}
		if id, ok := byName[a.id]; ok {
			out[id] = a
		}
	}
	return out
}

func (p *plugin) checkpointPath() string { return filepath.Join(p.cfg.PluginDir, CheckpointFile) }
