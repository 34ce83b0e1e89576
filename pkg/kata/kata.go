// Package kata points a Kata Containers configuration at the guest kernel,
// image and initrd of a pulled artifact, and picks the configuration that
// belongs to a runtime class.
//
// The configuration is rewritten line by line, not re-serialised: every
// other key, comment and blank line stays as the artifact's authors wrote it.
package kata

import (
	"bytes"
	"errors"
	"fmt"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
)

// Sentinel errors.
var (
	// ErrNoConfig means no configuration file fits the runtime class.
	ErrNoConfig = errors.New("no Kata configuration for the runtime class")
	// ErrMissingFile means the configuration names a file the artifact lacks.
	ErrMissingFile = errors.New("file not in the artifact")
	// ErrNothingToRewrite means no [hypervisor.*] table sets kernel, image or initrd.
	ErrNothingToRewrite = errors.New("no kernel, image or initrd in any [hypervisor.*] table")
)

// ConfigFor picks the configuration of a runtime class among an artifact's
// files: the configuration-*.toml whose dash-separated words are those of
// the class without its "kata-" prefix, in any order, so that the class
// kata-qemu-nvidia-gpu finds configuration-qemu-nvidia-gpu.toml and
// configuration-nvidia-gpu-qemu.toml alike. An artifact with a single
// configuration file serves any class.
func ConfigFor(runtimeClass string, files []string) (string, error) {
	var configs []string
	for _, f := range files {
		if strings.HasPrefix(f, "configuration") && strings.HasSuffix(f, ".toml") && !strings.Contains(f, "/") {
			configs = append(configs, f)
		}
	}
	want := words(strings.TrimPrefix(runtimeClass, "kata-"))
	var found []string
	for _, c := range configs {
		name := strings.TrimSuffix(strings.TrimPrefix(strings.TrimPrefix(c, "configuration"), "-"), ".toml")
		if slices.Equal(words(name), want) {
			found = append(found, c)
		}
	}
	switch {
	case len(found) == 1:
		return found[0], nil
	case len(found) == 0 && len(configs) == 1:
		return configs[0], nil
	case len(found) > 1:
		return "", fmt.Errorf("%w %s: several fit: %s", ErrNoConfig, runtimeClass, strings.Join(found, ", "))
	}
	if len(configs) == 0 {
		return "", fmt.Errorf("%w %s: the artifact has no configuration*.toml (files: %s)", ErrNoConfig, runtimeClass, strings.Join(files, ", "))
	}
	return "", fmt.Errorf("%w %s: none of %s fits", ErrNoConfig, runtimeClass, strings.Join(configs, ", "))
}

func words(s string) []string {
	w := strings.FieldsFunc(s, func(r rune) bool { return r == '-' || r == '_' })
	slices.Sort(w)
	return w
}

var (
	tableHeader = regexp.MustCompile(`^\s*\[\s*([^\]]+?)\s*\]`)
	assetLine   = regexp.MustCompile(`^(\s*)(kernel|image|initrd)(\s*=\s*)(?:"([^"]*)"|'([^']*)')(.*)$`)
)

// patterns find a file of each kind when the configured name is not in the
// artifact.
var patterns = map[string]func(string) bool{
	"kernel": func(f string) bool { return strings.HasPrefix(path.Base(f), "vmlinu") },
	"initrd": func(f string) bool { return strings.Contains(path.Base(f), "initrd") },
	"image": func(f string) bool {
		b := path.Base(f)
		return !strings.Contains(b, "initrd") && (strings.HasSuffix(b, ".img") || strings.HasSuffix(b, ".image"))
	},
}

// Rewrite returns config with the kernel, image and initrd of every
// [hypervisor.*] table pointing into dir, at the artifact file of the same
// base name or, failing that, the only file of that kind (vmlinu* for the
// kernel, *initrd* for the initrd, *.img or *.image for the image). A key
// that finds no file is an error that names it; so is a configuration with
// nothing to rewrite.
func Rewrite(config []byte, dir string, files []string) ([]byte, error) {
	lines := bytes.SplitAfter(config, []byte("\n"))
	table := ""
	rewritten := 0
	for i, line := range lines {
		if m := tableHeader.FindSubmatch(line); m != nil {
			table = string(m[1])
			continue
		}
		if !strings.HasPrefix(table, "hypervisor.") {
			continue
		}
		m := assetLine.FindSubmatch(bytes.TrimRight(line, "\r\n"))
		if m == nil {
			continue
		}
		key, old := string(m[2]), string(m[4])+string(m[5])
		name, err := pick(key, old, files)
		if err != nil {
			return nil, fmt.Errorf("[%s] %s = %q: %w", table, key, old, err)
		}
		eol := line[len(bytes.TrimRight(line, "\r\n")):]
		lines[i] = []byte(fmt.Sprintf("%s%s%s%q%s%s", m[1], key, m[3], filepath.Join(dir, name), m[6], eol))
		rewritten++
	}
	if rewritten == 0 {
		return nil, ErrNothingToRewrite
	}
	return bytes.Join(lines, nil), nil
}

func pick(key, old string, files []string) (string, error) {
	if base := path.Base(old); slices.Contains(files, base) {
		return base, nil
	}
	var found []string
	for _, f := range files {
		if patterns[key](f) {
			found = append(found, f)
		}
	}
	switch len(found) {
	case 1:
		return found[0], nil
	case 0:
		return "", fmt.Errorf("%w: no %s among %s", ErrMissingFile, key, strings.Join(files, ", "))
	}
	return "", fmt.Errorf("%w: %s is not there and several files could be the %s: %s", ErrMissingFile, path.Base(old), key, strings.Join(found, ", "))
}
