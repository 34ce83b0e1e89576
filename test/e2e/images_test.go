package e2e

import (
	"archive/tar"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	ocilayout "github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/gpu-sandbox/gpu-sandbox/test/e2e/testbed"
)

var agents = []string{"vfio-manager", "sandbox-device-plugin", "kata-manager"}

// The operand images, built here without a Docker engine, pushed to a
// registry, pulled back, and run from their own file system; their
// entrypoint and user are those of the Dockerfiles.
func TestImages(t *testing.T) {
	reg := testbed.StartRegistry(t, "", "")
	cmd := exec.Command("go", "run", "./test/e2e/cmd/imagebuild", "--bin", binDir, "--version", testVersion,
		"--push", reg.Host+"/gpu-sandbox", "--plain-http")
	cmd.Dir = repoRoot()
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("imagebuild: %v\n%s", err, out)
	}
	for _, agent := range agents {
		t.Run(agent, func(t *testing.T) {
			ref, err := name.ParseReference(reg.Host+"/gpu-sandbox/"+agent+":"+testVersion, name.Insecure)
			if err != nil {
				t.Fatal(err)
			}
			img, err := remote.Image(ref)
			if err != nil {
				t.Fatal(err)
			}
			cfg, err := img.ConfigFile()
			if err != nil {
				t.Fatal(err)
			}
			dockerfile, err := os.ReadFile(filepath.Join(repoRoot(), "deployments/container", agent+".Dockerfile"))
			if err != nil {
				t.Fatal(err)
			}
			entry := regexp.MustCompile(`(?m)^ENTRYPOINT \["([^"]+)"\]`).FindSubmatch(dockerfile)
			user := regexp.MustCompile(`(?m)^USER (\S+)`).FindSubmatch(dockerfile)
			if entry == nil || user == nil || !slices.Equal(cfg.Config.Entrypoint, []string{string(entry[1])}) || cfg.Config.User != string(user[1]) {
				t.Errorf("image entrypoint %v user %q; the Dockerfile says %s and %s", cfg.Config.Entrypoint, cfg.Config.User, entry, user)
			}
			if !strings.Contains(string(dockerfile), "FROM scratch") {
				t.Error("the Dockerfile's final stage is not scratch")
			}

			root := t.TempDir()
			if err := extract(mutate.Extract(img), root); err != nil {
				t.Fatal(err)
			}
			// The names the operator calls the binary by, and the busybox
			// tools, as the Dockerfile lists them.
			names := []string{agent}
			for _, m := range regexp.MustCompile(`ln -s \S+ /out/usr/bin/(\S+)`).FindAllSubmatch(dockerfile, -1) {
				names = append(names, string(m[1]))
			}
			for _, n := range names {
				out, err := exec.Command(filepath.Join(root, "usr/bin", n), "--version").CombinedOutput()
				if err != nil || !strings.Contains(string(out), testVersion) {
					t.Errorf("%s --version from the image: %v %s", n, err, out)
				}
			}
			list := regexp.MustCompile(`for a in ([^;]+); do`).FindSubmatch(dockerfile)
			if list == nil {
				t.Fatal("the Dockerfile lists no busybox tools")
			}
			for _, a := range strings.Fields(string(list[1])) {
				if target, err := os.Readlink(filepath.Join(root, "bin", a)); err != nil || target != "busybox" {
					t.Errorf("/bin/%s: %q, %v; want a link to busybox", a, target, err)
				}
			}
			if !slices.Contains(cfg.Config.Env, "PATH=/usr/bin:/bin") {
				t.Errorf("image environment %v lacks PATH", cfg.Config.Env)
			}
			// The operator's commands: sh -c, bash scripts, and for
			// kata-manager /bin/entrypoint.sh, all inside the image.
			commands := [][]string{{"/bin/sh", "-c", "test -x /bin/busybox && sleep 0 && echo shell"},
				{"/bin/bash", "-c", `[[ "$0" == "/bin/bash" || -n "$0" ]] && echo bash`}}
			if agent == "kata-manager" {
				commands = append(commands, []string{"/bin/sh", "-c", "/bin/entrypoint.sh --version"})
			}
			for _, c := range commands {
				out, err := exec.Command("chroot", append([]string{root}, c...)...).CombinedOutput()
				if err != nil || len(out) == 0 {
					t.Errorf("%v in the image: %v %s", c, err, out)
				}
			}
			if _, err := os.Stat(filepath.Join(root, "etc/ssl/certs/ca-certificates.crt")); err != nil {
				t.Errorf("no CA bundle for registries over HTTPS: %v", err)
			}
		})
	}
}

// buildImages builds our images without a Docker engine into an OCI
// layout at dir.
func buildImages(t *testing.T, dir string) {
	t.Helper()
	cmd := exec.Command("go", "run", "./test/e2e/cmd/imagebuild", "--bin", binDir, "--version", testVersion, "--oci-layout", dir)
	cmd.Dir = repoRoot()
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("imagebuild: %v\n%s", err, out)
	}
}

// agentImages reads the images of an OCI layout by agent: the image's
// org.opencontainers.image.title label, as imagebuild writes it.
func agentImages(t *testing.T, dir string) map[string]v1.Image {
	t.Helper()
	p, err := ocilayout.FromPath(dir)
	if err != nil {
		t.Fatalf("images (%s): %v", dir, err)
	}
	idx, err := p.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	m, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	images := map[string]v1.Image{}
	for _, d := range m.Manifests {
		img, err := idx.Image(d.Digest)
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		images[cfg.Config.Labels["org.opencontainers.image.title"]] = img
	}
	return images
}

// extract unpacks an image's file system into dir, refusing paths outside it.
func extract(r io.ReadCloser, dir string) error {
	defer r.Close()
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if !filepath.IsLocal(h.Name) {
			return errors.New("unsafe path in image: " + h.Name)
		}
		path := filepath.Join(dir, h.Name)
		switch h.Typeflag {
		case tar.TypeDir:
			os.MkdirAll(path, 0o755)
		case tar.TypeSymlink:
			os.MkdirAll(filepath.Dir(path), 0o755)
			if err := os.Symlink(h.Linkname, path); err != nil {
				return err
			}
		case tar.TypeReg:
			os.MkdirAll(filepath.Dir(path), 0o755)
			f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, os.FileMode(h.Mode))
			if err != nil {
				return err
			}
			if _, err := io.Copy(f, tr); err != nil {
				f.Close()
				return err
			}
			f.Close()
		}
	}
}
