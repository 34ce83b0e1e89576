package kata_test

import (
	"reflect"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/kata"
)

// A rewrite changes only asset paths of hypervisor tables, each to a file
// of the artifact, and never panics: both documents read the same but for
// those values.
func FuzzRewrite(f *testing.F) {
	f.Add([]byte(config))
	f.Add([]byte(runtimeRS))
	f.Add([]byte("[hypervisor.qemu]\nkernel='/a/vmlinuz'\n[hypervisor.clh]\n  initrd = \"x\"  # c\r\n"))
	f.Add([]byte("kernel = \"top-level\"\n[ hypervisor.fc ]\nimage=\"a.img\""))
	f.Add([]byte("[hypervisor]\nqemu.kernel = \"\"\"\nx\"\"\"\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		out, err := kata.Rewrite(in, "/d", append(files, versioned...), kata.Options{})
		if err != nil {
			return
		}
		var a, b map[string]any
		if err := toml.Unmarshal(in, &a); err != nil {
			return // the parser took what the decoder refuses (duplicate keys, say): nothing to compare
		}
		if err := toml.Unmarshal(out, &b); err != nil {
			t.Fatalf("the rewrite is not TOML: %v\n%s", err, out)
		}
		sameButAssets(t, nil, a, b)
	})
}

func sameButAssets(t *testing.T, path []string, a, b any) {
	t.Helper()
	switch av := a.(type) {
	case map[string]any:
		bv, ok := b.(map[string]any)
		if !ok || len(av) != len(bv) {
			t.Fatalf("%s: %v became %v", strings.Join(path, "."), a, b)
		}
		for k := range av {
			sameButAssets(t, append(path, k), av[k], bv[k])
		}
	case []any:
		bv, ok := b.([]any)
		if !ok || len(av) != len(bv) {
			t.Fatalf("%s: %v became %v", strings.Join(path, "."), a, b)
		}
		for i := range av {
			sameButAssets(t, path, av[i], bv[i])
		}
	default:
		if reflect.DeepEqual(a, b) {
			return
		}
		s, ok := b.(string)
		if !ok || len(path) < 3 || path[0] != "hypervisor" || !strings.HasPrefix(s, "/d/") {
			t.Fatalf("%s: %v became %v", strings.Join(path, "."), a, b)
		}
	}
}
