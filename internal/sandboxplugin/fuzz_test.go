package sandboxplugin

import (
	"testing"
)

// Whatever name pci.ids has for a device, the resource name made of it is
// empty (the device id is used then) or valid, and at most 63 characters.
func FuzzModelName(f *testing.F) {
	for _, s := range []string{"GA102GL [A10]", "GH100 [H100 SXM5 80GB]", "  ", "[]", "é/ü.x", "A--B__C..", "0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n := ModelName(s)
		if n != "" && (!ValidResourceName(n) || len(n) > 63) {
			t.Fatalf("ModelName(%q) = %q: not a valid resource name", s, n)
		}
	})
}
