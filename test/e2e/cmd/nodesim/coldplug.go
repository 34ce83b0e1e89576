package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"
)

// qemuConfig holds the keys of a Kata configuration's [hypervisor.qemu]
// table that decide how the VM and its cold-plugged devices look.
type qemuConfig struct {
	Path          string `toml:"path"`
	Kernel        string `toml:"kernel"`
	Initrd        string `toml:"initrd"`
	MachineType   string `toml:"machine_type"`
	KernelParams  string `toml:"kernel_params"`
	DefaultVCPUs  int    `toml:"default_vcpus"`
	DefaultMemory int    `toml:"default_memory"`
	ColdPlugVFIO  string `toml:"cold_plug_vfio"`
	HotPlugVFIO   string `toml:"hot_plug_vfio"`
	PCIeRootPort  int    `toml:"pcie_root_port"`
}

func coldplug(args []string) error {
	fs := flag.NewFlagSet("coldplug", flag.ExitOnError)
	config := fs.String("config", "", "Kata configuration file")
	cdiRoot := fs.String("cdi-root", "", "directory of the CDI specs")
	dryRun := fs.Bool("dry-run", false, "print the command line only")
	accelFlag := fs.String("accel", "auto", "kvm, tcg, or auto: kvm where /dev/kvm opens")
	fs.Parse(args)
	if *config == "" || *cdiRoot == "" || fs.NArg() == 0 {
		usage()
	}
	raw, err := os.ReadFile(*config)
	if err != nil {
		return err
	}
	var cfg struct {
		Hypervisor struct {
			QEMU qemuConfig `toml:"qemu"`
		} `toml:"hypervisor"`
	}
	if err := toml.Unmarshal(raw, &cfg); err != nil {
		return fmt.Errorf("%s: %w", *config, err)
	}
	q := cfg.Hypervisor.QEMU
	if q.ColdPlugVFIO != "root-port" {
		return fmt.Errorf("%s: cold_plug_vfio = %q; only root-port (kata-qemu-nvidia-gpu's) is done here", *config, q.ColdPlugVFIO)
	}
	if q.HotPlugVFIO != "" && q.HotPlugVFIO != "no-port" {
		return fmt.Errorf("%s: hot_plug_vfio = %q; cold plug wants no-port", *config, q.HotPlugVFIO)
	}

	cache, err := cdiapi.NewCache(cdiapi.WithSpecDirs(*cdiRoot), cdiapi.WithAutoRefresh(false))
	if err != nil {
		return err
	}
	devs, err := resolveCDI(cache, fs.Args())
	if err != nil {
		return err
	}
	var functions []string
	for _, d := range devs {
		fns, err := hostFunctions(d.Path)
		if err != nil {
			return err
		}
		functions = append(functions, fns...)
	}
	if len(functions) == 0 {
		return fmt.Errorf("CDI devices %v name no VFIO group or device", fs.Args())
	}
	if q.PCIeRootPort < len(functions) {
		return fmt.Errorf("%s: pcie_root_port = %d, fewer than the %d functions to cold plug", *config, q.PCIeRootPort, len(functions))
	}

	accel := *accelFlag
	if accel == "auto" {
		accel = "tcg"
		if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err == nil {
			f.Close()
			accel = "kvm"
		}
	}
	cpu := map[string]string{"kvm": "host", "tcg": "max"}[accel]
	if cpu == "" {
		return fmt.Errorf("--accel %q: want kvm, tcg or auto", *accelFlag)
	}
	argv := []string{q.Path,
		"-machine", q.MachineType + ",accel=" + accel, "-cpu", cpu,
		"-m", strconv.Itoa(q.DefaultMemory) + "M", "-smp", strconv.Itoa(max(q.DefaultVCPUs, 1)),
		"-nodefaults", "-nographic", "-serial", "stdio", "-no-reboot",
		"-kernel", q.Kernel, "-initrd", q.Initrd,
		"-append", strings.TrimSpace(q.KernelParams + " console=ttyS0 panic=-1")}
	// Kata's root ports: on the root bus, chassis 0, a slot each.
	for i := range q.PCIeRootPort {
		argv = append(argv, "-device", fmt.Sprintf("pcie-root-port,id=rp%d,bus=pcie.0,chassis=0,slot=%d,multifunction=false", i, i))
	}
	for i, f := range functions {
		argv = append(argv, "-device", fmt.Sprintf("vfio-pci,host=%s,bus=rp%d", f, i))
	}
	fmt.Printf("coldplug accel=%s %s\n", accel, strings.Join(argv, " "))
	if *dryRun {
		return nil
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, os.Stdout, os.Stderr
	start := time.Now()
	err = cmd.Run()
	fmt.Printf("coldplug exit=%d seconds=%.1f\n", cmd.ProcessState.ExitCode(), time.Since(start).Seconds())
	return err
}

// hostFunctions maps a CDI device node to the PCI functions behind it, as
// Kata does: a group node to the group's endpoint functions in sysfs (a
// bridge stays with the host), an iommufd device node to its one function.
// The container node /dev/vfio/vfio names none.
func hostFunctions(node string) ([]string, error) {
	base := filepath.Base(node)
	switch dir := filepath.Dir(node); {
	case node == "/dev/vfio/vfio" || node == "/dev/iommu":
		return nil, nil
	case dir == "/dev/vfio/devices":
		link, err := os.Readlink(filepath.Join("/sys/class/vfio-dev", base, "device"))
		if err != nil {
			return nil, fmt.Errorf("function of %s: %w", node, err)
		}
		return []string{filepath.Base(link)}, nil
	case dir == "/dev/vfio":
		sys := filepath.Join("/sys/kernel/iommu_groups", base, "devices")
		entries, err := os.ReadDir(sys)
		if err != nil {
			return nil, fmt.Errorf("functions of %s: %w", node, err)
		}
		var out []string
		for _, e := range entries {
			class, err := os.ReadFile(filepath.Join(sys, e.Name(), "class"))
			if err != nil {
				return nil, err
			}
			if !strings.HasPrefix(string(class), "0x0604") {
				out = append(out, e.Name())
			}
		}
		slices.Sort(out)
		return out, nil
	}
	return nil, errors.New(node + ": not a VFIO device node")
}
