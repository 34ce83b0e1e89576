package containerd

import (
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"

	"github.com/pelletier/go-toml/v2"
	"github.com/pelletier/go-toml/v2/unstable"
)

// addInPlace returns base, the administrator's file without our entries,
// with the settings added as marked text: keys of the CRI table set on
// their own lines (or replaced in place, keeping the old text in the
// marker), and the runtime tables in one block at the end.
func addInPlace(base []byte, r Release, plugin string, s Settings) ([]byte, error) {
	if len(s.Runtimes) == 0 && s.CDISpecDirs == nil {
		return base, nil
	}
	if base == nil {
		return addInPlaceTo(nil, r, plugin, s)
	}
	return withFinalBreak(base, func(work []byte, _ string) ([]byte, error) { return addInPlaceTo(work, r, plugin, s) })
}

func addInPlaceTo(base []byte, r Release, plugin string, s Settings) ([]byte, error) {
	d, err := parseDoc(base)
	if err != nil {
		return nil, err
	}
	tree, err := parse(base)
	if err != nil {
		return nil, err
	}
	cri := []string{"plugins", plugin}
	var edits []edit
	var block []string
	if len(settingsOf(d)) == 0 {
		edits = append(edits, edit{0, 0, versionLine(base, d.eol)})
	}

	if s.CDISpecDirs != nil {
		want := map[string]any{"enable_cdi": true, "cdi_spec_dirs": s.CDISpecDirs}
		var lines []string // keys that go on new lines of the CRI table
		for _, k := range []string{"enable_cdi", "cdi_spec_dirs"} {
			val, err := tomlValue(want[k])
			if err != nil {
				return nil, err
			}
			path := append(slices.Clone(cri), k)
			e := findKey(d, path)
			if e == nil {
				lines = append(lines, k+" = "+val)
				continue
			}
			if sameValue(lookup(tree, path...), want[k]) {
				continue
			}
			end := e.end - len(lineBreak(base, e.end))
			old := string(base[e.valStart:end])
			if strings.ContainsAny(old, "\r\n") {
				return nil, fmt.Errorf("%s spans several lines: set it to %s by hand", strings.Join(path, "."), val)
			}
			edits = append(edits, edit{e.valStart, end, val + "  " + wasPrefix + old + ")"})
		}
		if len(lines) > 0 {
			if h := findTable(d, cri); h != nil {
				indent := indentOf(base, h.start) + "  "
				text := ""
				for _, l := range lines {
					text += indent + l + "  " + marker + d.eol
				}
				edits = append(edits, edit{h.end, h.end, text})
			} else {
				block = append(block, header(cri))
				for _, l := range lines {
					block = append(block, "  "+l)
				}
			}
		}
	}

	runtimesPath := append(slices.Clone(cri), "containerd", "runtimes")
	existing, _ := lookup(tree, runtimesPath...).(map[string]any)
	tables := map[string]map[string]any{}
	for _, r := range s.Runtimes {
		tables[r.Name] = runtimeTable(r)
	}
	if len(tables) > 0 && len(existing) == 0 {
		cfg, _ := lookup(tree, cri...).(map[string]any)
		if name, t := defaultRuntime(cfg, r); t != nil {
			tables[name] = t
		}
	}
	for _, name := range slices.Sorted(maps.Keys(tables)) {
		lines, err := tableLines(append(slices.Clone(runtimesPath), name), tables[name])
		if err != nil {
			return nil, err
		}
		block = append(block, lines...)
	}

	out := apply(base, edits)
	if len(block) > 0 {
		text := blockBegin + blockLegend + d.eol + strings.Join(block, d.eol) + d.eol + blockEnd + d.eol
		out = append(out, text...)
	}
	if err := checkInPlace(out, runtimesPath, cri, tables, s); err != nil {
		return nil, err
	}
	return out, nil
}

// checkInPlace makes sure the edited file loads and says what we meant:
// an administrator's layout (inline tables, dotted keys) can make text
// added at the end mean something else, or nothing.
func checkInPlace(out []byte, runtimesPath, cri []string, tables map[string]map[string]any, s Settings) error {
	got, err := parse(out)
	if err != nil {
		return fmt.Errorf("the entries cannot be added in place (%v): use the drop-in route", err)
	}
	for name, t := range tables {
		if !sameValue(lookup(got, append(slices.Clone(runtimesPath), name)...), t) {
			return fmt.Errorf("runtime %q added in place does not read back as written: use the drop-in route", name)
		}
	}
	if s.CDISpecDirs != nil && (!sameValue(lookup(got, append(slices.Clone(cri), "enable_cdi")...), true) ||
		!sameValue(lookup(got, append(slices.Clone(cri), "cdi_spec_dirs")...), s.CDISpecDirs)) {
		return fmt.Errorf("CDI settings added in place do not read back as written: use the drop-in route")
	}
	return nil
}

// tableLines writes a table as a header and its keys, sub-tables after.
func tableLines(path []string, t map[string]any) ([]string, error) {
	lines := []string{header(path)}
	var subs []string
	for _, k := range slices.Sorted(maps.Keys(t)) {
		if _, ok := t[k].(map[string]any); ok {
			subs = append(subs, k)
			continue
		}
		v, err := tomlValue(t[k])
		if err != nil {
			return nil, err
		}
		lines = append(lines, "  "+quoteKey(k)+" = "+v)
	}
	for _, k := range subs {
		sub, err := tableLines(append(slices.Clone(path), k), t[k].(map[string]any))
		if err != nil {
			return nil, err
		}
		lines = append(lines, sub...)
	}
	return lines, nil
}

// findKey returns the expression that sets a key, by its full path.
func findKey(d *doc, path []string) *expr {
	for i, e := range d.exprs {
		if e.kind == unstable.KeyValue && slices.Equal(slices.Concat(e.table, e.key), path) {
			return &d.exprs[i]
		}
	}
	return nil
}

// findTable returns the header that defines a table.
func findTable(d *doc, path []string) *expr {
	for i, e := range d.exprs {
		if e.kind == unstable.Table && slices.Equal(e.key, path) {
			return &d.exprs[i]
		}
	}
	return nil
}

func indentOf(raw []byte, start int) string {
	i := start
	for i < len(raw) && (raw[i] == ' ' || raw[i] == '\t') {
		i++
	}
	return string(raw[start:i])
}

// sameValue compares a parsed TOML value with one this package writes.
func sameValue(got, want any) bool {
	b, err := toml.Marshal(map[string]any{"v": want})
	if err != nil {
		return false
	}
	w, err := parse(b)
	return err == nil && reflect.DeepEqual(got, w["v"])
}
