// Package kata points a Kata Containers configuration at the guest kernel,
// image and initrd of a pulled artifact, and picks the configuration that
// belongs to a runtime class.
//
// The configuration is parsed, not re-serialised: only the bytes of the
// asset paths change, and every other key, comment and blank line stays as
// the artifact's authors wrote it.
package kata

import (
	"errors"
	"fmt"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/pelletier/go-toml/v2/unstable"
)

// Sentinel errors.
var (
	// ErrNoConfig means no configuration file fits the runtime class.
	ErrNoConfig = errors.New("no Kata configuration for the runtime class")
	// ErrMissingFile means the configuration names a file the artifact lacks.
	ErrMissingFile = errors.New("file not in the artifact")
	// ErrNothingToRewrite means no [hypervisor.*] table sets an asset path.
	ErrNothingToRewrite = errors.New("no kernel, image, initrd, firmware or guest extension image in any [hypervisor.*] table")
	// ErrInvalidConfig means the configuration is not TOML.
	ErrInvalidConfig = errors.New("invalid Kata configuration")
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

// Options tune Rewrite. The zero value picks files by the configured names
// and the kinds of files alone.
type Options struct {
	// RuntimeClass helps choose among several files of one kind (images
	// of several driver versions, confidential and not): the file sharing
	// the most words with the class and the configured name wins.
	RuntimeClass string
}

// assetKind is what a configuration key points at, and whether the
// artifact must have it.
type assetKind struct {
	kind     string // kernel, image, initrd, firmware, extension
	required bool
}

// assetKey tells whether a key, by its full path, is an asset path of a
// hypervisor: kernel, image and initrd must be in the artifact; firmware
// and firmware volumes are rewritten when the artifact ships them (they
// are often the host's OVMF); every guest extension image (runtime-rs:
// [[hypervisor.<h>.guest_extension_images]] path) must be.
func assetKey(path []string) (assetKind, bool) {
	if len(path) < 3 || path[0] != "hypervisor" {
		return assetKind{}, false
	}
	switch {
	case len(path) == 3 && (path[2] == "kernel" || path[2] == "image" || path[2] == "initrd"):
		return assetKind{path[2], true}, true
	case len(path) == 3 && (path[2] == "firmware" || path[2] == "firmware_volume"):
		return assetKind{"firmware", false}, true
	case len(path) == 4 && path[2] == "guest_extension_images" && path[3] == "path":
		return assetKind{"extension", true}, true
	}
	return assetKind{}, false
}

// patterns find a file of each kind when the configured name is not in the
// artifact.
var patterns = map[string]func(string) bool{
	"kernel": func(f string) bool { return strings.HasPrefix(path.Base(f), "vmlinu") },
	"initrd": func(f string) bool { return strings.Contains(path.Base(f), "initrd") },
	"image": func(f string) bool {
		b := path.Base(f)
		return !strings.Contains(b, "initrd") && !strings.Contains(b, "extension") && (strings.HasSuffix(b, ".img") || strings.HasSuffix(b, ".image"))
	},
	"extension": func(f string) bool {
		b := path.Base(f)
		return strings.Contains(b, "extension") && (strings.HasSuffix(b, ".img") || strings.HasSuffix(b, ".image"))
	},
	"firmware": func(string) bool { return false }, // only by name
}

// Rewrite returns config with every asset path of its [hypervisor.*] tables
// (kernel, image, initrd, firmware, guest extension images) pointing into
// dir: at the artifact file of the same base name or, failing that, the
// file of that kind (vmlinu* for the kernel, *initrd* for the initrd, *.img
// or *.image for images, *extension* for extension images), chosen among
// several by Options.RuntimeClass. A required key that finds no file is an
// error naming it; so is a configuration with nothing to rewrite.
//
// The configuration is parsed (dotted keys, [[arrays of tables]] and
// multi-line strings included), and only the bytes of the values change:
// every other key, comment and blank line stays as the authors wrote it.
func Rewrite(config []byte, dir string, files []string, opts Options) ([]byte, error) {
	p := unstable.Parser{}
	p.Reset(config)
	type edit struct {
		start, end int
		text       string
	}
	var edits []edit
	var table []string
	for p.NextExpression() {
		n := p.Expression()
		switch n.Kind {
		case unstable.Table, unstable.ArrayTable:
			table = keyOf(n)
			continue
		case unstable.KeyValue:
		default:
			continue
		}
		full := append(slices.Clone(table), keyOf(n)...)
		kind, ok := assetKey(full)
		v := n.Value()
		if !ok || v.Kind != unstable.String {
			continue
		}
		old := string(v.Data)
		if old == "" {
			continue // not set: the runtime's default
		}
		name, err := pick(kind, old, files, opts.RuntimeClass)
		if errors.Is(err, errNotShipped) {
			continue
		}
		where := "[" + strings.Join(table, ".") + "]"
		if n.Kind == unstable.KeyValue && len(table) == 0 {
			where = "top level"
		}
		if err != nil {
			return nil, fmt.Errorf("%s %s = %q: %w", where, strings.Join(keyOf(n), "."), old, err)
		}
		edits = append(edits, edit{int(v.Raw.Offset), int(v.Raw.Offset + v.Raw.Length), strconv.Quote(filepath.Join(dir, name))})
	}
	if err := p.Error(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	if len(edits) == 0 {
		return nil, ErrNothingToRewrite
	}
	var out []byte
	at := 0
	for _, e := range edits {
		out = append(out, config[at:e.start]...)
		out = append(out, e.text...)
		at = e.end
	}
	return append(out, config[at:]...), nil
}

func keyOf(n *unstable.Node) []string {
	var k []string
	for it := n.Key(); it.Next(); {
		k = append(k, string(it.Node().Data))
	}
	return k
}

// errNotShipped marks an optional asset the artifact does not carry.
var errNotShipped = errors.New("not shipped")

func pick(kind assetKind, old string, files []string, runtimeClass string) (string, error) {
	if base := path.Base(old); slices.Contains(files, base) {
		return base, nil
	}
	var found []string
	for _, f := range files {
		if patterns[kind.kind](f) {
			found = append(found, f)
		}
	}
	if len(found) > 1 {
		found = closest(found, nameWords(path.Base(old)+"-"+runtimeClass))
	}
	switch {
	case len(found) == 1:
		return found[0], nil
	case len(found) == 0 && !kind.required:
		return "", errNotShipped
	case len(found) == 0:
		return "", fmt.Errorf("%w: no %s among %s", ErrMissingFile, kind.kind, strings.Join(files, ", "))
	}
	return "", fmt.Errorf("%w: %s is not there and several files could be the %s: %s", ErrMissingFile, path.Base(old), kind.kind, strings.Join(found, ", "))
}

// closest keeps the candidates that share the most words with hint, after
// leaving out confidential builds (snp, tdx, confidential) that the hint
// does not ask for.
func closest(candidates, hint []string) []string {
	special := []string{"confidential", "snp", "tdx", "coco", "debug", "devkit"}
	if slices.Contains(hint, "snp") || slices.Contains(hint, "tdx") {
		hint = append(hint, "confidential") // what the CC runtime classes run
	}
	var kept []string
	for _, c := range candidates {
		ok := true
		for _, w := range nameWords(c) {
			if slices.Contains(special, w) && !slices.Contains(hint, w) {
				ok = false
			}
		}
		if ok {
			kept = append(kept, c)
		}
	}
	if len(kept) == 0 {
		kept = candidates
	}
	best, score := []string(nil), -1
	for _, c := range kept {
		n := 0
		for _, w := range nameWords(c) {
			if slices.Contains(hint, w) {
				n++
			}
		}
		switch {
		case n > score:
			best, score = []string{c}, n
		case n == score:
			best = append(best, c)
		}
	}
	return best
}

// nameWords splits a file name into its words: "kata-ubuntu-noble-nvidia-gpu-580.image"
// gives kata, ubuntu, noble, nvidia, gpu, 580, image.
func nameWords(s string) []string {
	return strings.FieldsFunc(s, func(r rune) bool { return r == '-' || r == '_' || r == '.' })
}
