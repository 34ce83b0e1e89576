package containerd

import (
	"bytes"
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"github.com/pelletier/go-toml/v2"
	"github.com/pelletier/go-toml/v2/unstable"
)

// Files this package does not own are edited as text, never re-serialised:
// the administrator's comments, order and formatting stay as they were,
// and every line added carries a marker, so that what was added can be
// taken out again from the file as it is now, whatever else changed in it.
//
//   - a whole line ends with "# gpu-sandbox";
//   - a value replaced in place ends with "# gpu-sandbox (was: <old>)",
//     <old> being the replaced text up to the end of its line;
//   - tables are added in one block between "# gpu-sandbox: begin" and
//     "# gpu-sandbox: end" lines at the end of the file;
//   - an entry added to an existing imports array is recognised by its
//     path, which is the drop-in's;
//   - a file that did not end with a line break gets one before anything
//     is added, and a last line saying so.
const (
	marker      = "# gpu-sandbox"
	wasPrefix   = marker + " (was: "
	blockBegin  = marker + ": begin"
	blockEnd    = marker + ": end"
	blockLegend = " (kata-manager adds and removes this block; edit the settings above it)"
	eofMarker   = marker + ": the file ended without a line break"
)

// expr is one top-level TOML expression of a document, with the byte
// ranges an edit needs.
type expr struct {
	kind  unstable.Kind // Table, ArrayTable, KeyValue or Comment
	table []string      // the table a key is in; a header's own path
	key   []string      // a key's parts
	// start and end span the expression's whole lines, line break included.
	start, end int
	// valStart and valEnd span a key's value.
	valStart, valEnd int
	// comment is the comment that ends the line, or the comment itself.
	comment      string
	commentStart int
}

// doc is a TOML document split into expressions.
type doc struct {
	raw   []byte
	eol   string // the line break the file uses
	exprs []expr
	// imports holds, for the top-level imports array, each element's value
	// and byte range.
	imports []element
	hasImps bool
}

type element struct {
	value      string
	start, end int
}

func parseDoc(raw []byte) (*doc, error) {
	d := &doc{raw: raw, eol: "\n"}
	if bytes.Contains(raw, []byte("\r\n")) {
		d.eol = "\r\n"
	}
	p := unstable.Parser{KeepComments: true}
	p.Reset(raw)
	var table []string
	for p.NextExpression() {
		n := p.Expression()
		e := expr{kind: n.Kind, start: -1}
		switch n.Kind {
		case unstable.Comment:
			e.start, e.end = lineStart(raw, int(n.Raw.Offset)), lineEnd(raw, int(n.Raw.Offset+n.Raw.Length))
			e.comment, e.commentStart = string(n.Data), int(n.Raw.Offset)
			e.table = table
		case unstable.Table, unstable.ArrayTable:
			var last unstable.Range
			for it := n.Key(); it.Next(); {
				k := it.Node()
				e.key = append(e.key, string(k.Data))
				if e.start < 0 {
					e.start = lineStart(raw, int(k.Raw.Offset))
				}
				last = k.Raw
			}
			table = e.key
			e.table = e.key
			e.end = lineEnd(raw, int(last.Offset+last.Length))
			if c := n.Next(); c != nil && c.Kind == unstable.Comment {
				e.comment, e.commentStart = string(c.Data), int(c.Raw.Offset)
			}
		case unstable.KeyValue:
			var last unstable.Range
			for it := n.Key(); it.Next(); {
				k := it.Node()
				e.key = append(e.key, string(k.Data))
				last = k.Raw
			}
			e.table = table
			e.start = lineStart(raw, int(n.Raw.Offset))
			e.valStart = afterEquals(raw, int(last.Offset+last.Length))
			e.valEnd = int(n.Raw.Offset + n.Raw.Length)
			e.end = lineEnd(raw, e.valEnd)
			if c := n.Next(); c != nil && c.Kind == unstable.Comment {
				e.comment, e.commentStart = string(c.Data), int(c.Raw.Offset)
			}
			if len(table) == 0 && slices.Equal(e.key, []string{"imports"}) && n.Value().Kind == unstable.Array {
				d.hasImps = true
				for it := n.Value().Children(); it.Next(); {
					if c := it.Node(); c.Kind == unstable.String {
						d.imports = append(d.imports, element{string(c.Data), int(c.Raw.Offset), int(c.Raw.Offset + c.Raw.Length)})
					}
				}
			}
		}
		d.exprs = append(d.exprs, e)
	}
	if err := p.Error(); err != nil {
		return nil, err
	}
	return d, nil
}

func lineStart(raw []byte, i int) int {
	return bytes.LastIndexByte(raw[:i], '\n') + 1
}

func lineEnd(raw []byte, i int) int {
	if j := bytes.IndexByte(raw[i:], '\n'); j >= 0 {
		return i + j + 1
	}
	return len(raw)
}

// afterEquals skips "ws = ws" after a key.
func afterEquals(raw []byte, i int) int {
	for i < len(raw) && (raw[i] == ' ' || raw[i] == '\t') {
		i++
	}
	if i < len(raw) && raw[i] == '=' {
		i++
	}
	for i < len(raw) && (raw[i] == ' ' || raw[i] == '\t') {
		i++
	}
	return i
}

// edit replaces raw[start:end] with text.
type edit struct {
	start, end int
	text       string
}

// apply makes the edits, which must not overlap, in one pass.
func apply(raw []byte, edits []edit) []byte {
	slices.SortStableFunc(edits, func(a, b edit) int { return a.start - b.start })
	out := make([]byte, 0, len(raw))
	at := 0
	for _, e := range edits {
		out = append(out, raw[at:e.start]...)
		out = append(out, e.text...)
		at = e.end
	}
	return append(out, raw[at:]...)
}

// strip takes out of a document everything this package added to it: the
// block, every marked line, replaced values (given back their old text), and
// the imports entries naming one of dropIns. What is left is the
// administrator's file as it would be had we never touched it.
func strip(raw []byte, dropIns []string) ([]byte, error) {
	if raw == nil {
		return nil, nil // no file: nothing to strip, and still no file
	}
	d, err := parseDoc(raw)
	if err != nil {
		return nil, err
	}
	var edits []edit
	begin := -1
	for _, e := range d.exprs {
		switch {
		case e.kind == unstable.Comment && strings.HasPrefix(e.comment, blockBegin):
			if begin >= 0 {
				return nil, fmt.Errorf("two %q lines without %q between them", blockBegin, blockEnd)
			}
			begin = e.start
		case e.kind == unstable.Comment && strings.HasPrefix(e.comment, blockEnd):
			if begin < 0 {
				return nil, fmt.Errorf("%q without %q", blockEnd, blockBegin)
			}
			edits = append(edits, edit{begin, e.end, ""})
			begin = -1
		case begin >= 0:
			// inside the block: goes with it
		case e.kind == unstable.KeyValue && len(e.table) == 0 && slices.Equal(e.key, []string{"imports"}):
			edits = append(edits, stripImports(d, e, dropIns)...)
		case e.kind == unstable.KeyValue && strings.HasPrefix(e.comment, wasPrefix) && strings.HasSuffix(e.comment, ")"):
			old := strings.TrimSuffix(strings.TrimPrefix(e.comment, wasPrefix), ")")
			end := e.end - len(lineBreak(raw, e.end))
			edits = append(edits, edit{e.valStart, end, old})
		case e.kind == unstable.KeyValue && e.comment == marker:
			edits = append(edits, edit{e.start, e.end, ""})
		}
	}
	if begin >= 0 {
		return nil, fmt.Errorf("%q without %q", blockBegin, blockEnd)
	}
	return stripFinalBreak(apply(raw, edits))
}

// stripFinalBreak takes out the line break added to a file that had none,
// with the line that says so: both when that line is still the last,
// only the line when the administrator added lines after it.
func stripFinalBreak(raw []byte) ([]byte, error) {
	d, err := parseDoc(raw)
	if err != nil {
		return nil, err
	}
	for _, e := range d.exprs {
		if e.kind != unstable.Comment || e.comment != eofMarker {
			continue
		}
		start := e.start
		if e.end == len(raw) && bytes.HasSuffix(raw[:start], []byte(d.eol)) {
			start -= len(d.eol)
		}
		return apply(raw, []edit{{start, e.end, ""}}), nil
	}
	return raw, nil
}

// withFinalBreak runs an edit on a file that ends with a line break: one
// that does not gets one, and the line that says so, when anything is added.
func withFinalBreak(raw []byte, add func(work []byte, eol string) ([]byte, error)) ([]byte, error) {
	eol := "\n"
	if bytes.Contains(raw, []byte("\r\n")) {
		eol = "\r\n"
	}
	if len(raw) == 0 || bytes.HasSuffix(raw, []byte("\n")) {
		return add(raw, eol)
	}
	work := append(slices.Clip(raw), eol...)
	out, err := add(work, eol)
	if err != nil || bytes.Equal(out, work) {
		return raw, err
	}
	return append(out, eofMarker+eol...), nil
}

// lineBreak is the line break that ends the line ending at end.
func lineBreak(raw []byte, end int) string {
	switch {
	case bytes.HasSuffix(raw[:end], []byte("\r\n")):
		return "\r\n"
	case bytes.HasSuffix(raw[:end], []byte("\n")):
		return "\n"
	}
	return ""
}

// stripImports takes our entries out of the imports array: the whole line
// when we added it and nothing else is left in it, else each entry with
// the separator that was added with it.
func stripImports(d *doc, e expr, dropIns []string) []edit {
	var ours []int
	for i, el := range d.imports {
		if slices.Contains(dropIns, el.value) {
			ours = append(ours, i)
		}
	}
	if e.comment == marker && len(ours) == len(d.imports) {
		return []edit{{e.start, e.end, ""}}
	}
	var edits []edit
	for _, i := range ours {
		el := d.imports[i]
		switch {
		case i > 0 && !slices.Contains(ours, i-1):
			edits = append(edits, edit{separatorBefore(d.raw, d.imports[i-1].end, el.start), el.end, ""})
		case i+1 < len(d.imports):
			edits = append(edits, edit{el.start, separatorAfter(d.raw, el.end, d.imports[i+1].start), ""})
		default:
			edits = append(edits, edit{el.start, el.end, ""})
		}
	}
	if e.comment == marker {
		// The line was ours, but the administrator added to it: it stays theirs.
		edits = append(edits, edit{e.commentStart, e.end - len(lineBreak(d.raw, e.end)), ""})
		if at := e.commentStart; at > 0 && (d.raw[at-1] == ' ' || d.raw[at-1] == '\t') {
			edits[len(edits)-1].start = strings.LastIndexFunc(string(d.raw[:at]), func(r rune) bool { return r != ' ' && r != '\t' }) + 1
		}
	}
	return edits
}

// separatorBefore returns where the separator between two elements starts:
// right after the previous one when the text between is the ", " we insert,
// else at the comma before the element.
func separatorBefore(raw []byte, prevEnd, start int) int {
	if string(raw[prevEnd:start]) == ", " {
		return prevEnd
	}
	if i := bytes.LastIndexByte(raw[prevEnd:start], ','); i >= 0 {
		return prevEnd + i
	}
	return start
}

// separatorAfter returns where the next element starts, so that an element
// and its separator go together.
func separatorAfter(raw []byte, end, next int) int {
	if i := bytes.IndexByte(raw[end:next], ','); i >= 0 {
		j := end + i + 1
		for j < next && raw[j] == ' ' {
			j++
		}
		return j
	}
	return end
}

// addImport returns raw with path in its top-level imports, unless an entry
// (a path or a glob) already names it. A file without settings also gets
// "version = 2", which containerd 1.x needs to read plugin URIs.
func addImport(raw []byte, path string) ([]byte, error) {
	if raw == nil {
		return []byte(versionLine(nil, "\n") + "imports = [" + quote(path) + "]  " + marker + "\n"), nil
	}
	return withFinalBreak(raw, func(work []byte, _ string) ([]byte, error) { return addImportTo(work, path) })
}

func addImportTo(raw []byte, path string) ([]byte, error) {
	d, err := parseDoc(raw)
	if err != nil {
		return nil, err
	}
	for _, e := range d.exprs {
		if e.kind != unstable.KeyValue || len(e.table) != 0 || !slices.Equal(e.key, []string{"imports"}) {
			continue
		}
		if !d.hasImps {
			return nil, fmt.Errorf("%w: imports is not an array of strings", ErrInvalidConfig)
		}
		list := make([]string, len(d.imports))
		for i, el := range d.imports {
			list[i] = el.value
		}
		if imported(list, path) {
			return raw, nil
		}
		if len(d.imports) == 0 {
			open := bytes.IndexByte(raw[e.valStart:e.valEnd], '[')
			return apply(raw, []edit{{e.valStart + open + 1, e.valStart + open + 1, quote(path)}}), nil
		}
		last := d.imports[len(d.imports)-1].end
		return apply(raw, []edit{{last, last, ", " + quote(path)}}), nil
	}
	line := "imports = [" + quote(path) + "]  " + marker + d.eol
	if len(settingsOf(d)) == 0 {
		return slices.Concat([]byte(versionLine(raw, d.eol)+line), raw), nil
	}
	// After the version line, else first: top-level keys precede tables.
	for _, e := range d.exprs {
		if e.kind == unstable.Table || e.kind == unstable.ArrayTable {
			break
		}
		if e.kind == unstable.KeyValue && slices.Equal(e.key, []string{"version"}) {
			return apply(raw, []edit{{e.end, e.end, line}}), nil
		}
	}
	return slices.Concat([]byte(line), raw), nil
}

// versionLine is the version a file without settings needs for plugin
// URIs: marked in the administrator's file, plain in one we create (which
// is theirs once they add to it, and must keep meaning the same).
func versionLine(raw []byte, eol string) string {
	if raw == nil {
		return "version = 2" + eol
	}
	return "version = 2  " + marker + eol
}

// settingsOf lists the expressions that are not comments.
func settingsOf(d *doc) []expr {
	var out []expr
	for _, e := range d.exprs {
		if e.kind != unstable.Comment {
			out = append(out, e)
		}
	}
	return out
}

// imported reports whether an imports entry (a path or a glob) names path.
func imported(list []string, path string) bool {
	for _, p := range list {
		if p == path {
			return true
		}
		if ok, _ := filepath.Match(p, path); ok {
			return true
		}
	}
	return false
}

var bareKey = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)

// quoteKey writes one part of a dotted TOML key.
func quoteKey(k string) string {
	if bareKey.MatchString(k) {
		return k
	}
	return quote(k)
}

// quote writes a TOML basic string, as containerd's own files spell them.
func quote(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, "\\u%04X", r)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
	return b.String()
}

// tomlValue writes a value as TOML on one line.
func tomlValue(v any) (string, error) {
	b, err := toml.Marshal(map[string]any{"v": v})
	if err != nil {
		return "", err
	}
	_, s, _ := strings.Cut(strings.TrimSpace(string(b)), " = ")
	return s, nil
}

// header writes a table header for a path.
func header(path []string) string {
	parts := make([]string, len(path))
	for i, k := range path {
		parts[i] = quoteKey(k)
	}
	return "[" + strings.Join(parts, ".") + "]"
}
