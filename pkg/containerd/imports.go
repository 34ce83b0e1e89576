package containerd

import (
	"bytes"
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/pelletier/go-toml/v2"
)

// The main configuration is edited as text, not re-serialised, so that the
// administrator's comments, order and formatting stay as they were: only
// the top-level imports array changes.

var (
	importsLine = regexp.MustCompile(`^\s*imports\s*=`)
	versionLine = regexp.MustCompile(`^\s*version\s*=`)
	tableLine   = regexp.MustCompile(`^\s*\[`)
)

// importsSpan finds the value of the top-level imports key: the byte range
// of its array, or -1 when the file has none.
func importsSpan(raw []byte) (start, end int) {
	offset := 0
	for _, line := range bytes.SplitAfter(raw, []byte("\n")) {
		if tableLine.Match(line) {
			break // top-level keys end at the first table
		}
		if loc := importsLine.FindIndex(line); loc != nil {
			open := bytes.IndexByte(line[loc[1]:], '[')
			if open < 0 {
				return -1, -1
			}
			start = offset + loc[1] + open
			if end = arrayEnd(raw, start); end < 0 {
				return -1, -1
			}
			return start, end
		}
		offset += len(line)
	}
	return -1, -1
}

// arrayEnd returns the index just past the ']' closing the array opened at
// start, skipping strings and comments.
func arrayEnd(raw []byte, start int) int {
	depth := 0
	for i := start; i < len(raw); i++ {
		switch c := raw[i]; c {
		case '[':
			depth++
		case ']':
			if depth--; depth == 0 {
				return i + 1
			}
		case '#':
			for i < len(raw) && raw[i] != '\n' {
				i++
			}
		case '"', '\'':
			for i++; i < len(raw) && raw[i] != c; i++ {
				if c == '"' && raw[i] == '\\' {
					i++
				}
			}
		}
	}
	return -1
}

func parseArray(span []byte) ([]string, error) {
	var v struct{ A []string }
	if err := toml.Unmarshal(append([]byte("A = "), span...), &v); err != nil {
		return nil, err
	}
	return v.A, nil
}

func renderArray(list []string) string {
	quoted := make([]string, len(list))
	for i, s := range list {
		quoted[i] = strconv.Quote(s)
	}
	return "[" + strings.Join(quoted, ", ") + "]"
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

// addImport returns raw with path appended to its imports. A file without
// settings also gets "version = 2", which containerd 1.x needs to read
// plugin URIs.
func addImport(raw []byte, path string, empty bool) ([]byte, error) {
	if start, end := importsSpan(raw); start >= 0 {
		list, err := parseArray(raw[start:end])
		if err != nil {
			return nil, fmt.Errorf("%w: imports: %w", ErrInvalidConfig, err)
		}
		if imported(list, path) {
			return raw, nil
		}
		out := slices.Concat(raw[:start], []byte(renderArray(append(list, path))), raw[end:])
		return out, nil
	}
	line := []byte("imports = " + renderArray([]string{path}) + "\n")
	if empty {
		return slices.Concat([]byte("version = 2\n"), line, raw), nil
	}
	// After the version line, else first: top-level keys precede tables.
	offset := 0
	for _, l := range bytes.SplitAfter(raw, []byte("\n")) {
		if tableLine.Match(l) {
			break
		}
		offset += len(l)
		if versionLine.Match(l) {
			if !bytes.HasSuffix(l, []byte("\n")) {
				line = append([]byte("\n"), line...)
			}
			return slices.Concat(raw[:offset], line, raw[offset:]), nil
		}
	}
	return slices.Concat(line, raw), nil
}

// removeImport returns raw without path in its imports.
func removeImport(raw []byte, path string) []byte {
	start, end := importsSpan(raw)
	if start < 0 {
		return raw
	}
	list, err := parseArray(raw[start:end])
	if err != nil || !slices.Contains(list, path) {
		return raw
	}
	list = slices.DeleteFunc(list, func(s string) bool { return s == path })
	return slices.Concat(raw[:start], []byte(renderArray(list)), raw[end:])
}
