package vfio

import (
	"bufio"
	"fmt"
	"os"
	"path"
	"strings"
)

// vfioAlias is one "alias vfio_pci:<pattern> <module>" line of modules.alias:
// the kernel's table of vfio variant drivers and the devices each serves.
type vfioAlias struct {
	pattern string // glob over the part of a modalias after "pci:"
	module  string
}

// readVFIOAliases reads the vfio_pci aliases of a modules.alias file. A
// missing file yields none, and every device gets the generic vfio-pci.
func readVFIOAliases(file string) ([]vfioAlias, error) {
	f, err := os.Open(file)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read module aliases: %w", err)
	}
	defer f.Close()
	var aliases []vfioAlias
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) != 3 || fields[0] != "alias" {
			continue
		}
		if p, ok := strings.CutPrefix(fields[1], "vfio_pci:"); ok {
			aliases = append(aliases, vfioAlias{pattern: p, module: fields[2]})
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read module aliases %q: %w", file, err)
	}
	return aliases, nil
}

// vfioVariant picks the vfio driver for a device: the module whose alias
// matches the modalias most specifically (fewest wildcards), else vfio-pci.
func vfioVariant(aliases []vfioAlias, modalias string) (driver, module string) {
	id, ok := strings.CutPrefix(modalias, "pci:")
	if !ok {
		return DriverVFIOPCI, moduleOf(DriverVFIOPCI)
	}
	best, bestLiteral := "", -1
	for _, a := range aliases {
		if ok, _ := path.Match(a.pattern, id); !ok {
			continue
		}
		if literal := len(a.pattern) - strings.Count(a.pattern, "*"); literal > bestLiteral {
			best, bestLiteral = a.module, literal
		}
	}
	if best == "" {
		return DriverVFIOPCI, moduleOf(DriverVFIOPCI)
	}
	return driverOf(best), best
}

// The generic driver registers as "vfio-pci" from module vfio_pci; the
// variants register under their module names.
func driverOf(module string) string {
	if module == "vfio_pci" {
		return DriverVFIOPCI
	}
	return module
}

func moduleOf(driver string) string {
	return strings.ReplaceAll(driver, "-", "_")
}
