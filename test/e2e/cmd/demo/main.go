// Command demo runs gpu-sandbox's main job on a simulated node: a fake HGX
// H100 board whose kernel is emulated, the real agents built from this tree,
// and what a cluster administrator would look at after each step.
package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio/vfiotest"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
}

type demo struct {
	work  string // everything the demo writes, removed at the end
	bin   string
	tree  *vfiotest.Tree
	start time.Time
}

func run() error {
	d := &demo{start: time.Now()}
	var err error
	if d.work, err = os.MkdirTemp("", "gpu-sandbox-demo-"); err != nil {
		return err
	}
	defer os.RemoveAll(d.work)

	d.step("Building the agents from this tree")
	d.bin = filepath.Join(d.work, "bin")
	if err := d.build(); err != nil {
		return err
	}

	d.step("Simulating a node: HGX H100 board (8 GPUs, 4 NVSwitches) with an emulated kernel")
	if d.tree, err = vfiotest.Build(filepath.Join(d.work, "node"), vfiotest.HGXH100()); err != nil {
		return err
	}
	emu, err := d.tree.Start()
	if err != nil {
		return err
	}
	defer emu.Close()
	fmt.Printf("  sysfs %s\n  /dev  %s\n", d.tree.SysfsRoot, d.tree.DevRoot)

	d.step("vfio-manager status: what bind --all would touch")
	if err := d.agent("vfio-manager", "status"); err != nil {
		return err
	}
	d.step("vfio-manager bind --all: GPUs and NVSwitches to vfio-pci, one IOMMU group at a time, in parallel")
	if err := d.agent("vfio-manager", "bind", "--all"); err != nil {
		return err
	}
	if err := d.agent("vfio-manager", "status"); err != nil {
		return err
	}
	entries, _ := os.ReadDir(filepath.Join(d.tree.DevRoot, "vfio"))
	var nodes []string
	for _, e := range entries {
		nodes = append(nodes, "/dev/vfio/"+e.Name())
	}
	fmt.Printf("  VFIO nodes: %s\n", strings.Join(nodes, " "))

	d.step("vfio-manager unbind --all: every device back to the driver it had")
	if err := d.agent("vfio-manager", "unbind", "--all"); err != nil {
		return err
	}
	d.step(fmt.Sprintf("Done in %s; the simulated node is removed", time.Since(d.start).Round(10*time.Millisecond)))
	return nil
}

func (d *demo) step(msg string) {
	fmt.Printf("\n==> %s\n", msg)
}

func (d *demo) build() error {
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..", "..", "..")
	cmd := exec.Command("go", "build", "-o", d.bin+"/", "./cmd/...")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	return cmd.Run()
}

// agent runs one of the project's binaries against the simulated node,
// indenting what it prints.
func (d *demo) agent(name string, args ...string) error {
	fmt.Printf("  $ %s %s\n", name, strings.Join(args, " "))
	args = append(args,
		"--sysfs-root", d.tree.SysfsRoot, "--dev-root", d.tree.DevRoot, "--host-root", d.tree.HostRoot,
		"--state-dir", filepath.Join(d.work, "state"), "--load-modules=false", "--bind-nvswitches",
		"--log-level", "warn")
	cmd := exec.Command(filepath.Join(d.bin, name), args...)
	out, err := cmd.CombinedOutput()
	for _, line := range strings.Split(strings.TrimRight(string(out), "\n"), "\n") {
		fmt.Printf("    %s\n", line)
	}
	if err != nil {
		return fmt.Errorf("%s %s: %w", name, strings.Join(args, " "), err)
	}
	return nil
}
