// Package testbed starts the real components the end-to-end tests and the
// demo run against: the distribution registry in process, Debian's
// containerd under a supervisor, and artifacts shaped like NVIDIA's.
package testbed

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/distribution/distribution/v3/configuration"
	_ "github.com/distribution/distribution/v3/registry/auth/htpasswd"
	"github.com/distribution/distribution/v3/registry/handlers"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/inmemory"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/sirupsen/logrus"
	"golang.org/x/crypto/bcrypt"
	"oras.land/oras-go/v2"
	"oras.land/oras-go/v2/content"
	"oras.land/oras-go/v2/registry/remote"
	"oras.land/oras-go/v2/registry/remote/auth"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/containerd"
)

// T is the part of testing.TB the testbed uses; a demo can provide it too.
type T interface {
	Helper()
	Fatal(args ...any)
	Fatalf(format string, args ...any)
	Cleanup(func())
	TempDir() string
	Failed() bool
	Logf(format string, args ...any)
}

// Registry is the distribution registry in the test process, with
// in-memory storage, behind httptest.
type Registry struct {
	srv  *httptest.Server
	Host string // host:port
}

// StartRegistry serves a registry; with user set, it requires that user
// and password (htpasswd).
func StartRegistry(t T, user, password string) *Registry {
	t.Helper()
	logrus.SetLevel(logrus.ErrorLevel) // the registry logs every request through logrus
	logrus.SetOutput(io.Discard)
	cfg := &configuration.Configuration{Storage: configuration.Storage{"inmemory": configuration.Parameters{},
		"maintenance": configuration.Parameters{"uploadpurging": map[any]any{"enabled": false}}}}
	cfg.HTTP.Secret = "e2e"
	if user != "" {
		hash, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.MinCost)
		if err != nil {
			t.Fatal(err)
		}
		file := filepath.Join(t.TempDir(), "htpasswd")
		if err := os.WriteFile(file, []byte(user+":"+string(hash)+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg.Auth = configuration.Auth{"htpasswd": configuration.Parameters{"realm": "e2e", "path": file}}
	}
	app := handlers.NewApp(context.Background(), cfg)
	srv := httptest.NewServer(app)
	t.Cleanup(srv.Close)
	u, _ := url.Parse(srv.URL)
	return &Registry{srv: srv, Host: u.Host}
}

// Files are the files of a test artifact, by title.
type Files map[string][]byte

// KataArtifact is shaped like NVIDIA's kata-gpu-artifacts: a Kata
// configuration, a kernel and an initrd, the last two of size bytes each.
func KataArtifact(seed byte, size int) Files {
	blob := func(tag byte) []byte {
		b := make([]byte, size)
		for i := range b {
			b[i] = byte(i*31) ^ tag ^ seed
		}
		return b
	}
	return Files{
		"configuration-nvidia-gpu-qemu.toml":  []byte(fmt.Sprintf("[hypervisor.qemu]\npath = \"/opt/kata/bin/qemu-system-x86_64\"\nkernel = \"/opt/kata/share/kata-containers/vmlinuz.container\"\ninitrd = \"/opt/kata/share/kata-containers/kata-containers-initrd.img\"\n# seed %d\n", seed)),
		"vmlinuz-6.1.62-nvidia-gpu":           blob(1),
		"kata-ubuntu-jammy-nvidia-gpu.initrd": blob(2),
	}
}

// pushTarget is where PushArtifact writes: a repository with optional
// basic auth.
func Repository(t T, host, repo, user, password string) *remote.Repository {
	t.Helper()
	r, err := remote.NewRepository(host + "/" + repo)
	if err != nil {
		t.Fatal(err)
	}
	r.PlainHTTP = true
	if user != "" {
		r.Client = &auth.Client{Credential: auth.StaticCredential(host, auth.Credential{Username: user, Password: password})}
	}
	return r
}

// PushArtifact pushes files as an oras artifact (empty config, one titled
// layer per file) and tags it; it returns the manifest descriptor. Titles
// are taken as given, so hostile ones can be pushed too.
func PushArtifact(t T, r *remote.Repository, tag string, files Files) ocispec.Descriptor {
	t.Helper()
	ctx := context.Background()
	var layers []ocispec.Descriptor
	for _, name := range SortedKeys(files) {
		desc := content.NewDescriptorFromBytes("application/octet-stream", files[name])
		desc.Annotations = map[string]string{ocispec.AnnotationTitle: name}
		if err := r.Push(ctx, desc, bytes.NewReader(files[name])); err != nil {
			t.Fatalf("push %s: %v", name, err)
		}
		layers = append(layers, desc)
	}
	desc, err := oras.PackManifest(ctx, r, oras.PackManifestVersion1_1, "application/vnd.gpu-sandbox.test.artifact",
		oras.PackManifestOptions{Layers: layers})
	if err != nil {
		t.Fatal(err)
	}
	if tag != "" {
		if err := r.Tag(ctx, desc, tag); err != nil {
			t.Fatal(err)
		}
	}
	return desc
}

func SortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	for i := 1; i < len(keys); i++ {
		for j := i; j > 0 && keys[j] < keys[j-1]; j-- {
			keys[j], keys[j-1] = keys[j-1], keys[j]
		}
	}
	return keys
}

// program returns a program from the system; a missing one fails the test.
func Program(t T, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is missing: run hack/install-test-deps.sh (make test does)", name)
	}
	return path
}

// Containerd is Debian's containerd run by the test, restarted when it
// exits (as systemd would), so that kata-manager's signal restart works.
type Containerd struct {
	Config string
	Socket string
	binary string
	env    []string // added to the test's environment
	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{} // closed when cmd has been waited for
	log    Output
	stop   bool
	held   bool // exits are not followed by a start until Release
	down   bool // exited while held
	starts int
}

// ContainerdBase is a version 2 configuration for a containerd that keeps
// everything under dir.
func ContainerdBase(dir string) string {
	return fmt.Sprintf(`# A node's containerd configuration, with the comments an administrator keeps.
version = 2
root = "%[1]s/root"
state = "%[1]s/state"

[grpc]
  address = "%[1]s/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "%[1]s/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
`, dir)
}

func StartContainerd(t T, config, socket string) *Containerd {
	t.Helper()
	return StartContainerdBinary(t, Program(t, "containerd"), nil, config, socket)
}

// StartContainerdBinary is StartContainerd for another containerd binary (a
// release hack/fetch-containerd.sh built), with env added to the test's
// environment (a PATH that finds the release's shim first).
func StartContainerdBinary(t T, binary string, env []string, config, socket string) *Containerd {
	t.Helper()
	c := &Containerd{Config: config, Socket: socket, binary: binary, env: env}
	c.start(t)
	t.Cleanup(func() {
		c.mu.Lock()
		c.stop = true
		c.mu.Unlock()
		for { // a restart may be under way: stop whichever process is current
			c.mu.Lock()
			cmd, exited := c.cmd, c.exited
			c.mu.Unlock()
			cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-exited:
			case <-time.After(10 * time.Second):
				cmd.Process.Kill()
				<-exited
			}
			c.mu.Lock()
			current := c.cmd == cmd
			c.mu.Unlock()
			if current {
				break
			}
		}
		if t.Failed() {
			t.Logf("containerd log:\n%s", c.logs())
		}
	})
	if err := containerd.NewRestarter(containerd.RestartNone, socket, containerd.WithTimeout(10*time.Second)).WaitReady(context.Background()); err != nil {
		t.Fatalf("containerd: %v\n%s", err, c.logs())
	}
	return c
}

// start runs containerd; the goroutine that waits for it starts it again
// when it exits, unless the test is over.
func (c *Containerd) start(t T) {
	cmd := exec.Command(c.binary, "--config", c.Config)
	if c.env != nil {
		cmd.Env = append(os.Environ(), c.env...)
	}
	cmd.Stdout, cmd.Stderr = &c.log, &c.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	c.mu.Lock()
	c.cmd, c.exited = cmd, exited
	c.starts++
	c.mu.Unlock()
	go func() {
		cmd.Wait()
		c.mu.Lock()
		stop, held := c.stop, c.held
		c.down = held && !stop
		c.mu.Unlock()
		if !stop && !held {
			c.start(t)
		}
		close(exited)
	}()
}

// Hold keeps containerd down after its next exit, as a supervisor that
// gave up or a node under pressure would, until Release.
func (c *Containerd) Hold() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.held = true
}

// Release ends Hold and starts containerd if it exited meanwhile.
func (c *Containerd) Release(t T) {
	c.mu.Lock()
	down := c.down
	c.held, c.down = false, false
	c.mu.Unlock()
	if down {
		c.start(t)
	}
}

// Restart restarts containerd as an administrator does (systemctl restart
// containerd): the process stops, its supervisor starts it again, and it
// answers.
func (c *Containerd) Restart(t T) {
	t.Helper()
	c.mu.Lock()
	cmd, exited := c.cmd, c.exited
	c.mu.Unlock()
	cmd.Process.Signal(syscall.SIGTERM)
	<-exited
	if err := containerd.NewRestarter(containerd.RestartNone, c.Socket, containerd.WithTimeout(10*time.Second)).WaitReady(context.Background()); err != nil {
		t.Fatalf("containerd after a restart: %v\n%s", err, c.logs())
	}
}

func (c *Containerd) logs() string { return c.log.String() }

func (c *Containerd) Starts() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.starts
}
