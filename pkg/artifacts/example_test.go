package artifacts_test

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/artifacts"
)

// References are parsed by oras-go; no tag means "latest". Docker Hub's
// are named as the docker CLI names them.
func ExampleParseReference() {
	for _, s := range []string{
		"nvcr.io/nvidia/cloud-native/kata-gpu-artifacts:ubuntu22.04-535",
		"registry.local:5000/kata",
		"registry.local:5000/kata@sha256:" + "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
		"index.docker.io/acme/kata:v1",
		"docker.io/kata",
	} {
		r, err := artifacts.ParseReference(s)
		fmt.Println(r.Registry, r.Repository, r.Reference, err)
	}
	_, err := artifacts.ParseReference("registry.local:5000/Kata:v1")
	fmt.Println(errors.Is(err, artifacts.ErrInvalidReference))
	// Output:
	// nvcr.io nvidia/cloud-native/kata-gpu-artifacts ubuntu22.04-535 <nil>
	// registry.local:5000 kata latest <nil>
	// registry.local:5000 kata sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef <nil>
	// docker.io acme/kata v1 <nil>
	// docker.io library/kata latest <nil>
	// true
}

// A pull that cannot reach its registry says which reference failed and why,
// and leaves the directory as it was.
func ExamplePull() {
	dir, _ := os.MkdirTemp("", "artifacts-example-")
	defer os.RemoveAll(dir)
	_, err := artifacts.Pull(context.Background(), "127.0.0.1:1/kata:v1", dir+"/kata-qemu-nvidia-gpu",
		artifacts.Options{PlainHTTP: true, Retries: -1})
	fmt.Println(err != nil)
	_, err = artifacts.Current(dir + "/kata-qemu-nvidia-gpu")
	fmt.Println(errors.Is(err, os.ErrNotExist))
	// Output:
	// true
	// true
}
