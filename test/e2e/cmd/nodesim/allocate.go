package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	oci "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/deviceplugin/deviceplugintest"
)

// harness is the part of testing.T the kubelet stand-in needs: a Fatal
// ends the command with the error, cleanups run at the end.
type harness struct{ cleanups []func() }

type fatal struct{ err error }

func (h *harness) Helper()                   {}
func (h *harness) Fatal(a ...any)            { panic(fatal{errors.New(fmt.Sprint(a...))}) }
func (h *harness) Fatalf(f string, a ...any) { panic(fatal{fmt.Errorf(f, a...)}) }
func (h *harness) Cleanup(f func())          { h.cleanups = append(h.cleanups, f) }

func (h *harness) run(f func() error) (err error) {
	defer func() {
		for i := len(h.cleanups) - 1; i >= 0; i-- {
			h.cleanups[i]()
		}
	}()
	defer func() {
		if r := recover(); r != nil {
			f, ok := r.(fatal)
			if !ok {
				panic(r)
			}
			err = f.err
		}
	}()
	return f()
}

type pod struct {
	ID       string                               `json:"id"`
	Response *pluginapi.ContainerAllocateResponse `json:"response"`
	CDI      []oci.LinuxDevice                    `json:"cdi"`
}

type report struct {
	Registration *pluginapi.RegisterRequest `json:"registration"`
	Devices      []*pluginapi.Device        `json:"devices"`
	Pods         []pod                      `json:"pods"`
}

func allocate(args []string) error {
	fs := flag.NewFlagSet("allocate", flag.ExitOnError)
	pluginDir := fs.String("plugin-dir", "", "the kubelet's device-plugin directory")
	resource := fs.String("resource", "", "extended resource to allocate from")
	cdiRoot := fs.String("cdi-root", "", "directory of the CDI specs")
	pods := fs.String("pods", "", "directory for each pod's /dev trees")
	fs.Parse(args)
	ids := fs.Args()
	if *pluginDir == "" || *resource == "" || *cdiRoot == "" || *pods == "" || len(ids) == 0 {
		usage()
	}
	h := &harness{}
	return h.run(func() error {
		k := deviceplugintest.Start(h, *pluginDir)
		p := k.WaitForDevices(*resource, func(list []*pluginapi.Device) bool {
			for _, id := range ids {
				if deviceplugintest.Health(list, id) != pluginapi.Healthy {
					return false
				}
			}
			return true
		})
		r := report{Devices: p.Devices()}
		for _, reg := range k.Registrations() {
			if reg.ResourceName == *resource {
				r.Registration = reg
			}
		}
		cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(*cdiRoot), cdiapi.WithAutoRefresh(false))
		if err != nil {
			return err
		}
		for _, id := range ids {
			resp, err := p.Client.Allocate(context.Background(), &pluginapi.AllocateRequest{
				ContainerRequests: []*pluginapi.ContainerAllocateRequest{{DevicesIds: []string{id}}}})
			if err != nil {
				return fmt.Errorf("allocate %s: %w", id, err)
			}
			if len(resp.ContainerResponses) != 1 {
				return fmt.Errorf("allocate %s: %d container answers for one container", id, len(resp.ContainerResponses))
			}
			c := resp.ContainerResponses[0]
			dir := filepath.Join(*pods, id)
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return err
			}
			for _, d := range c.Devices {
				if err := nodeFromHost(filepath.Join(dir, "devices"), d.ContainerPath, d.HostPath); err != nil {
					return fmt.Errorf("pod of %s: %w", id, err)
				}
			}
			var names []string
			for _, d := range c.CdiDevices {
				names = append(names, d.Name)
			}
			// For whoever plays the runtime next (nodesim coldplug).
			if err := os.WriteFile(filepath.Join(dir, "cdi-names"), []byte(strings.Join(names, "\n")+"\n"), 0o644); err != nil {
				return err
			}
			devs, err := resolveCDI(cache, names)
			if err != nil {
				return fmt.Errorf("pod of %s: %w", id, err)
			}
			for _, d := range devs {
				if err := mknod(filepath.Join(dir, "cdi"), d.Path, d.Major, d.Minor, *d.FileMode); err != nil {
					return fmt.Errorf("pod of %s: %w", id, err)
				}
			}
			r.Pods = append(r.Pods, pod{ID: id, Response: c, CDI: devs})
		}
		out, err := json.Marshal(r)
		if err != nil {
			return err
		}
		fmt.Printf("allocate %s\n", out)
		return nil
	})
}

// resolveCDI applies the CDI names to an empty OCI spec, as the runtime
// does, and returns the device nodes the spec then holds.
func resolveCDI(cache *cdiapi.Cache, names []string) ([]oci.LinuxDevice, error) {
	if len(names) == 0 {
		return nil, errors.New("the answer names no CDI device")
	}
	spec := &oci.Spec{Linux: &oci.Linux{}}
	if unresolved, err := cache.InjectDevices(spec, names...); err != nil {
		return nil, fmt.Errorf("resolve %v (unresolved %v): %w", names, unresolved, err)
	}
	devs := slices.Clone(spec.Linux.Devices)
	for _, d := range devs {
		if d.Type != "c" || d.FileMode == nil {
			return nil, fmt.Errorf("CDI device node %s: type %q, mode %v; want a character device with a mode", d.Path, d.Type, d.FileMode)
		}
	}
	return devs, nil
}

// nodeFromHost creates containerPath under root with the numbers and mode
// of hostPath, as a runtime creates a device spec's node.
func nodeFromHost(root, containerPath, hostPath string) error {
	var st unix.Stat_t
	if err := unix.Stat(hostPath, &st); err != nil {
		return fmt.Errorf("device spec host path: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFCHR {
		return fmt.Errorf("device spec host path %s is not a character device", hostPath)
	}
	return mknod(root, containerPath, int64(unix.Major(st.Rdev)), int64(unix.Minor(st.Rdev)), os.FileMode(st.Mode&0o777))
}

func mknod(root, containerPath string, major, minor int64, mode os.FileMode) error {
	rel, ok := strings.CutPrefix(containerPath, "/dev/")
	if !ok || strings.Contains(rel, "..") {
		return fmt.Errorf("container path %q is not under /dev", containerPath)
	}
	path := filepath.Join(root, rel)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	if err := unix.Mknod(path, unix.S_IFCHR|uint32(mode.Perm()), int(unix.Mkdev(uint32(major), uint32(minor)))); err != nil {
		return fmt.Errorf("mknod %s: %w", path, err)
	}
	return nil
}
