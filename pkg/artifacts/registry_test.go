package artifacts_test

import (
	"bytes"
	"context"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/distribution/distribution/v3/configuration"
	"github.com/distribution/distribution/v3/registry/handlers"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/inmemory"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/sirupsen/logrus"
	"oras.land/oras-go/v2"
	"oras.land/oras-go/v2/content"
	"oras.land/oras-go/v2/registry/remote"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/artifacts"
)

// testRegistry is the distribution registry in the test process, with
// in-memory storage, behind httptest. It records the requests it serves and
// can corrupt the blobs it sends.
type testRegistry struct {
	host    string       // host:port of the registry, plain HTTP, no auth
	handler http.Handler // the recording registry, for servers that put auth in front

	mu       sync.Mutex
	requests []string // "METHOD /path"
	corrupt  bool
	onServe  func(*http.Request)
	step     string // requests marked with another step (stepHeader) are not recorded
}

// stepHeader marks a request with the test step that made it: a pull that
// failed may still have requests on their way to the registry when it
// returns, and they must not count for the next step's pull.
const stepHeader = "X-Test-Step"

// stepTransport marks every request with a step.
type stepTransport struct{ step string }

func (s stepTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	req = req.Clone(req.Context())
	req.Header.Set(stepHeader, s.step)
	return http.DefaultTransport.RoundTrip(req)
}

// setStep records, from now on, only requests of this step or unmarked.
func (r *testRegistry) setStep(step string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.step = step
}

func startRegistry(t *testing.T) *testRegistry {
	t.Helper()
	// The registry logs every request through logrus' standard logger.
	logrus.SetLevel(logrus.ErrorLevel)
	logrus.SetOutput(io.Discard)
	cfg := &configuration.Configuration{Storage: configuration.Storage{
		"inmemory":    configuration.Parameters{},
		"maintenance": configuration.Parameters{"uploadpurging": map[any]any{"enabled": false}},
	}}
	cfg.HTTP.Secret = "unit"
	app := handlers.NewApp(context.Background(), cfg)
	r := &testRegistry{}
	r.handler = http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.mu.Lock()
		if s := req.Header.Get(stepHeader); s == "" || s == r.step {
			r.requests = append(r.requests, req.Method+" "+req.URL.Path)
		}
		corrupt := r.corrupt && req.Method == http.MethodGet && strings.Contains(req.URL.Path, "/blobs/")
		hook := r.onServe
		r.mu.Unlock()
		if hook != nil {
			hook(req)
		}
		if corrupt {
			w = &corruptWriter{ResponseWriter: w}
		}
		app.ServeHTTP(w, req)
	})
	srv := httptest.NewServer(r.handler)
	t.Cleanup(srv.Close)
	u, _ := url.Parse(srv.URL)
	r.host = u.Host
	return r
}

// served returns the requests served since the last call.
func (r *testRegistry) served() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.requests
	r.requests = nil
	return out
}

func (r *testRegistry) setCorrupt(on bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.corrupt = on
}

// setOnServe has hook called with every request, before it is served.
func (r *testRegistry) setOnServe(hook func(*http.Request)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.onServe = hook
}

// corruptWriter flips the first byte of a body, keeping its length: a blob
// that arrives whole but is not what its digest says.
type corruptWriter struct {
	http.ResponseWriter
	done bool
}

func (w *corruptWriter) Write(b []byte) (int, error) {
	if w.done || len(b) == 0 {
		return w.ResponseWriter.Write(b)
	}
	w.done = true
	c := slices.Clone(b)
	c[0] ^= 0xff
	return w.ResponseWriter.Write(c)
}

// testFiles are an artifact's files by title.
type testFiles map[string][]byte

// kataFiles is an artifact shaped like NVIDIA's kata-gpu-artifacts, its
// content different for each seed.
func kataFiles(seed byte) testFiles {
	blob := func(tag byte, size int) []byte {
		b := make([]byte, size)
		for i := range b {
			b[i] = byte(i*31) ^ tag ^ seed
		}
		return b
	}
	return testFiles{
		"configuration-nvidia-gpu-qemu.toml":  []byte("[hypervisor.qemu]\nkernel = \"vmlinuz\"\n# seed " + string('a'+rune(seed)) + "\n"),
		"vmlinuz-6.1.62-nvidia-gpu":           blob(1, 64<<10),
		"kata-ubuntu-jammy-nvidia-gpu.initrd": blob(2, 256<<10),
	}
}

// push pushes files to host/repo as oras push does (empty config, one
// titled layer per file) and tags the manifest.
func push(t *testing.T, host, repo, tag string, files testFiles) ocispec.Descriptor {
	t.Helper()
	ctx := context.Background()
	r, err := remote.NewRepository(host + "/" + repo)
	if err != nil {
		t.Fatal(err)
	}
	r.PlainHTTP = true
	var layers []ocispec.Descriptor
	for _, name := range slices.Sorted(maps.Keys(files)) {
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
	if err := r.Tag(ctx, desc, tag); err != nil {
		t.Fatal(err)
	}
	return desc
}

// checkDir fails the test unless dir holds exactly files (besides the
// metadata) and Current agrees with res.
func checkDir(t *testing.T, dir string, files testFiles, res *artifacts.Result) {
	t.Helper()
	cur, err := artifacts.Current(dir)
	if err != nil {
		t.Fatal(err)
	}
	if res != nil && (cur.Digest != res.Digest || cur.Path != res.Path) {
		t.Errorf("Current: %s at %s, the pull said %s at %s", cur.Digest, cur.Path, res.Digest, res.Path)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		if e.Name() != artifacts.MetadataFile {
			names = append(names, e.Name())
		}
	}
	if len(names) != len(files) {
		t.Errorf("%s holds %q, want %d files", dir, names, len(files))
	}
	for name, want := range files {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Errorf("%s: %v", name, err)
		} else if !bytes.Equal(got, want) {
			t.Errorf("%s: %d bytes differ from the %d pushed", name, len(got), len(want))
		}
	}
}
