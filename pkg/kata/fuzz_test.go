package kata_test

import (
	"bytes"
	"testing"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/kata"
)

// A rewrite changes only the kernel, image and initrd lines of hypervisor
// tables, and never panics.
func FuzzRewrite(f *testing.F) {
	f.Add([]byte(config))
	f.Add([]byte("[hypervisor.qemu]\nkernel='/a/vmlinuz'\n[hypervisor.clh]\n  initrd = \"x\"  # c\r\n"))
	f.Add([]byte("kernel = \"top-level\"\n[ hypervisor.fc ]\nimage=\"a.img\""))
	f.Fuzz(func(t *testing.T, in []byte) {
		out, err := kata.Rewrite(in, "/d", files)
		if err != nil {
			return
		}
		a, b := bytes.Split(in, []byte("\n")), bytes.Split(out, []byte("\n"))
		if len(a) != len(b) {
			t.Fatalf("line count changed: %d to %d", len(a), len(b))
		}
		for i := range a {
			if !bytes.Equal(a[i], b[i]) && !assetKey.Match(a[i]) {
				t.Fatalf("line %d changed and is not an asset: %q to %q", i+1, a[i], b[i])
			}
		}
	})
}
