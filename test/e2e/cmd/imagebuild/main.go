// Command imagebuild builds the three operand images without a Docker
// engine, with the same content as deployments/container/*.Dockerfile: the
// static binary and the names the GPU Operator calls it by, a static
// busybox shell with the few tools the operator's commands use, the CA
// bundle, root user, the binary as entrypoint. It pushes them to a
// registry or writes an OCI layout.
package main

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Agents are the three operand images.
var Agents = []string{"vfio-manager", "sandbox-device-plugin", "kata-manager"}

// aliases are the names the GPU Operator's DaemonSets call each binary by,
// installed as links in usr/bin.
var aliases = map[string][]string{
	"vfio-manager": {"vfio-manage"},
	"kata-manager": {"k8s-kata-manager"},
}

// applets are the busybox tools in bin/: what the operator's commands,
// probes, hooks and init containers run (sh -c with until loops, test,
// cat, sleep; vfio-manage.sh's getopt, readlink, basename, grep, awk).
var applets = []string{"sh", "cat", "sleep", "test", "[", "echo", "ls", "readlink", "basename", "dirname",
	"chroot", "grep", "awk", "env", "mkdir", "rm", "true", "false", "getopt", "head", "tr", "printf"}

// bashShim stands in for bash: scripts of the operator start with
// #!/bin/bash, and busybox answers only to its applets' names, so bash
// hands the script to busybox's sh (which knows [[ ]]).
const bashShim = "#!/bin/sh\nexec /bin/sh \"$@\"\n"

// entrypoint is what the operator runs in the kata-manager container
// (/bin/sh -c /bin/entrypoint.sh) when it does not mount its own.
const entrypoint = "#!/bin/sh\nexec k8s-kata-manager \"$@\"\n"

func main() {
	bin := flag.String("bin", "bin", "directory with the static binaries")
	version := flag.String("version", "devel", "image tag")
	push := flag.String("push", "", "registry and prefix to push to, e.g. 127.0.0.1:5000/gpu-sandbox")
	plainHTTP := flag.Bool("plain-http", false, "push over HTTP")
	ociLayout := flag.String("oci-layout", "", "write the images into this OCI layout directory")
	flag.Parse()
	if *push == "" && *ociLayout == "" {
		fmt.Fprintln(os.Stderr, "imagebuild: give --push or --oci-layout")
		os.Exit(2)
	}
	for _, agent := range Agents {
		img, err := build(*bin, agent, *version)
		if err == nil && *push != "" {
			var opts []name.Option
			if *plainHTTP {
				opts = append(opts, name.Insecure)
			}
			var ref name.Reference
			if ref, err = name.ParseReference(fmt.Sprintf("%s/%s:%s", *push, agent, *version), opts...); err == nil {
				err = remote.Write(ref, img)
				fmt.Println(ref)
			}
		}
		if err == nil && *ociLayout != "" {
			var p layout.Path
			if p, err = layout.FromPath(*ociLayout); err != nil {
				p, err = layout.Write(*ociLayout, empty.Index)
			}
			if err == nil {
				err = p.AppendImage(img)
				fmt.Println(*ociLayout, agent)
			}
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "imagebuild %s: %v\n", agent, err)
			os.Exit(1)
		}
	}
}

// build makes the image of one agent, as its Dockerfile's final stage does.
func build(bin, agent, version string) (v1.Image, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Unix(0, 0)
	dir := func(name string) error {
		return tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeDir, Mode: 0o755, ModTime: mtime})
	}
	file := func(name, src string, mode int64) error {
		b, err := os.ReadFile(src)
		if err != nil {
			return err
		}
		if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: mode, Size: int64(len(b)), ModTime: mtime}); err != nil {
			return err
		}
		_, err = tw.Write(b)
		return err
	}
	link := func(name, target string) error {
		return tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeSymlink, Linkname: target, Mode: 0o777, ModTime: mtime})
	}
	content := func(name, body string) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(body)), ModTime: mtime}); err != nil {
			return err
		}
		_, err := tw.Write([]byte(body))
		return err
	}
	for _, d := range []string{"bin/", "usr/", "usr/bin/", "etc/", "etc/ssl/", "etc/ssl/certs/"} {
		if err := dir(d); err != nil {
			return nil, err
		}
	}
	if err := file("usr/bin/"+agent, filepath.Join(bin, agent), 0o755); err != nil {
		return nil, err
	}
	for _, a := range aliases[agent] {
		if err := link("usr/bin/"+a, agent); err != nil {
			return nil, err
		}
	}
	busybox, err := staticBusybox()
	if err != nil {
		return nil, err
	}
	if err := file("bin/busybox", busybox, 0o755); err != nil {
		return nil, err
	}
	for _, a := range applets {
		if err := link("bin/"+a, "busybox"); err != nil {
			return nil, err
		}
	}
	if err := content("bin/bash", bashShim); err != nil {
		return nil, err
	}
	if agent == "kata-manager" {
		if err := content("bin/entrypoint.sh", entrypoint); err != nil {
			return nil, err
		}
	}
	if _, err := os.Stat("/etc/ssl/certs/ca-certificates.crt"); err == nil {
		if err := file("etc/ssl/certs/ca-certificates.crt", "/etc/ssl/certs/ca-certificates.crt", 0o644); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(buf.Bytes())), nil })
	if err != nil {
		return nil, err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, err
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", "amd64"
	cfg.Config.Entrypoint = []string{"/usr/bin/" + agent}
	cfg.Config.Env = []string{"PATH=/usr/bin:/bin"}
	cfg.Config.User = "0:0"
	cfg.Config.Labels = map[string]string{
		"org.opencontainers.image.title":   agent,
		"org.opencontainers.image.version": version,
		"org.opencontainers.image.source":  "https://github.com/gpu-sandbox/gpu-sandbox",
	}
	return mutate.ConfigFile(img, cfg)
}

// staticBusybox finds Debian's busybox-static: a busybox that needs no
// shared library, since the images have none.
func staticBusybox() (string, error) {
	path, err := exec.LookPath("busybox")
	if err != nil {
		return "", fmt.Errorf("busybox: %w (apt-get install busybox-static)", err)
	}
	f, err := elf.Open(path)
	if err != nil {
		return "", fmt.Errorf("busybox %s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return "", fmt.Errorf("busybox %s is linked dynamically: install busybox-static", path)
		}
	}
	return path, nil
}
