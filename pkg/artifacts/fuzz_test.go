package artifacts_test

import (
	"testing"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/artifacts"
)

// A reference either fails to parse or parses to one that prints and parses
// back the same: tags and digests are never split by hand.
func FuzzParseReference(f *testing.F) {
	for _, s := range []string{
		"nvcr.io/nvidia/cloud-native/kata-gpu-artifacts:ubuntu22.04-535",
		"localhost:5000/kata",
		"registry.local:5000/a/b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
		"host:port/repo", "UPPER/case", "a/b:c:d", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := artifacts.ParseReference(s)
		if err != nil {
			return
		}
		again, err := artifacts.ParseReference(r.String())
		if err != nil || again != r {
			t.Fatalf("%q parsed to %q, which parses to %q (%v)", s, r.String(), again.String(), err)
		}
		if r.Reference == "" {
			t.Fatalf("%q parsed without tag or digest", s)
		}
	})
}
