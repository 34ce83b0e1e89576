package sandboxplugin

import (
	"regexp"
	"strings"
	"testing"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
)

// The rule as regular expressions, as ModelName and ValidResourceName had
// it before they were written out by hand: they must agree on every input.
var (
	refSpaces      = regexp.MustCompile(`\s+`)
	refNameInvalid = regexp.MustCompile(`[^A-Za-z0-9_.]+`)
	refValidName   = regexp.MustCompile(`^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$`)
)

func refModelName(pciName string) string {
	n := strings.ToUpper(strings.TrimSpace(pciName))
	n = strings.NewReplacer("/", "_", ".", "_").Replace(n)
	n = refSpaces.ReplaceAllString(n, "_")
	n = refNameInvalid.ReplaceAllString(n, "")
	trim := func(s string) string {
		return strings.TrimFunc(s, func(r rune) bool { return !('A' <= r && r <= 'Z' || '0' <= r && r <= '9' || 'a' <= r && r <= 'z') })
	}
	n = trim(n)
	if len(n) > 63 {
		n = trim(n[:63])
	}
	return n
}

// Whatever name pci.ids has for a device, the resource name made of it is
// empty (the device id is used then) or valid, and at most 63 characters;
// and it is what the regular expressions of the rule give.
func FuzzModelName(f *testing.F) {
	for _, s := range []string{"GA102GL [A10]", "GH100 [H100 SXM5 80GB]", "  ", "[]", "é/ü.x", "A--B__C..", "0",
		"A \u00e9 B", "a\vb", "x\xffy", "ſ ı K"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n := vfio.ModelName(s)
		if n != "" && (!ValidResourceName(n) || len(n) > 63) {
			t.Fatalf("vfio.ModelName(%q) = %q: not a valid resource name", s, n)
		}
		if ref := refModelName(s); n != ref {
			t.Fatalf("vfio.ModelName(%q) = %q; the rule's regular expressions give %q", s, n, ref)
		}
		if got, ref := ValidResourceName(s), refValidName.MatchString(s); got != ref {
			t.Fatalf("ValidResourceName(%q) = %v; the rule's regular expression says %v", s, got, ref)
		}
	})
}
