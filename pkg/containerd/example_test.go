package containerd_test

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/containerd"
)

// Registering a Kata runtime through a drop-in, then giving the
// administrator's configuration back.
func Example() {
	dir, _ := os.MkdirTemp("", "containerd-example-")
	defer os.RemoveAll(dir)
	main := filepath.Join(dir, "config.toml") // containerd.DefaultConfigPath on a node
	original := "version = 2\n# keep me\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"pause:3.9\"\n"
	os.WriteFile(main, []byte(original), 0o644)

	e := containerd.NewEditor(main, filepath.Join(dir, "conf.d", "99-gpu-sandbox.toml"))
	changed, err := e.Apply(containerd.Settings{Runtimes: []containerd.Runtime{{
		Name: "kata-qemu-nvidia-gpu", Type: "io.containerd.kata-qemu-nvidia-gpu.v2",
		ConfigPath: "/opt/kata/configuration.toml", PodAnnotations: []string{"io.katacontainers.*"},
	}}})
	fmt.Println("changed:", changed, err)
	cfg, _ := containerd.Load(main)
	fmt.Println("imports:", len(cfg.Imports()))

	e.Revert()
	after, _ := os.ReadFile(main)
	fmt.Println("given back byte for byte:", string(after) == original)
	// Output:
	// changed: true <nil>
	// imports: 1
	// given back byte for byte: true
}
