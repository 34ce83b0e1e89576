package vfio_test

import (
	"regexp"
	"strings"
	"testing"

	"tags.cncf.io/container-device-interface/pkg/parser"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/vfio"
)

// The rule as regular expressions, as ModelName and ValidResourceName had
// it before they were written out by hand: they must agree on every input.
// refValidName is Kubernetes' rule for the name part of a resource.
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

// Whatever name pci.ids has for a device: the model name made of it is what
// the regular expressions of the rule give, empty or a valid Kubernetes
// name; the resource made of it is a valid resource name and the CDI kind
// Kata will ask for, as the CDI library parses it; and ValidResourceName
// is exactly both rules.
func FuzzModelName(f *testing.F) {
	for _, s := range []string{"GA102GL [A10]", "GH100 [H100 SXM5 80GB]", "  ", "[]", "é/ü.x", "A--B__C..", "0",
		"A \u00e9 B", "a\vb", "x\xffy", "ſ ı K", "3D controller", "A", "x-"} {
		f.Add(s, uint16(0x3ffe), false)
	}
	f.Add("GH100 [H100 NVSwitch]", uint16(0x22a3), true)
	f.Fuzz(func(t *testing.T, s string, device uint16, nvswitch bool) {
		n := vfio.ModelName(s)
		if n != "" && !refValidName.MatchString(n) {
			t.Fatalf("vfio.ModelName(%q) = %q: not a valid resource name", s, n)
		}
		if ref := refModelName(s); n != ref {
			t.Fatalf("vfio.ModelName(%q) = %q; the rule's regular expressions give %q", s, n, ref)
		}
		role := vfio.RoleGPU
		if nvswitch {
			role = vfio.RoleNVSwitch
		}
		r := vfio.ResourceName(s, device, role)
		if !refValidName.MatchString(r) {
			t.Fatalf("resource nvidia.com/%s (pci.ids %q): not a valid resource name", r, s)
		}
		kind := "nvidia.com/" + r
		if vendor, class, name, err := parser.ParseQualifiedName(kind + "=0000:65:00.0"); err != nil || vendor+"/"+class != kind || name != "0000:65:00.0" {
			t.Fatalf("resource %s (pci.ids %q): Kata's %s=0000:65:00.0 parses as %s/%s=%s, %v", kind, s, kind, vendor, class, name, err)
		}
		if r != n && vfio.ValidResourceName(n) {
			t.Fatalf("resource %s for pci.ids %q: the model name %q was valid", kind, s, n)
		}
		want := refValidName.MatchString(s) && parser.ValidateClassName(s) == nil
		if got := vfio.ValidResourceName(s); got != want {
			t.Fatalf("vfio.ValidResourceName(%q) = %v; Kubernetes' and CDI's rules say %v", s, got, want)
		}
	})
}
