package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/distribution/distribution/v3/configuration"
	_ "github.com/distribution/distribution/v3/registry/auth/htpasswd"
	"github.com/distribution/distribution/v3/registry/handlers"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/inmemory"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/sirupsen/logrus"
	"golang.org/x/crypto/bcrypt"
	"oras.land/oras-go/v2"
	"oras.land/oras-go/v2/content"
	"oras.land/oras-go/v2/registry/remote"
	"oras.land/oras-go/v2/registry/remote/auth"
)

// memRegistry is the distribution registry in the test process, with
// in-memory storage, behind httptest.
type memRegistry struct {
	srv  *httptest.Server
	Host string // host:port
}

// startRegistry serves a registry; with user set, it requires that user
// and password (htpasswd).
func startRegistry(t testing.TB, user, password string) *memRegistry {
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
	return &memRegistry{srv: srv, Host: u.Host}
}

// artifactFiles are the files of a test artifact, by title.
type artifactFiles map[string][]byte

// kataArtifact is shaped like NVIDIA's kata-gpu-artifacts: a Kata
// configuration, a kernel and an initrd, the last two of size bytes each.
func kataArtifact(seed byte, size int) artifactFiles {
	blob := func(tag byte) []byte {
		b := make([]byte, size)
		for i := range b {
			b[i] = byte(i*31) ^ tag ^ seed
		}
		return b
	}
	return artifactFiles{
		"configuration-nvidia-gpu-qemu.toml":  []byte(fmt.Sprintf("[hypervisor.qemu]\npath = \"/opt/kata/bin/qemu-system-x86_64\"\nkernel = \"/opt/kata/share/kata-containers/vmlinuz.container\"\ninitrd = \"/opt/kata/share/kata-containers/kata-containers-initrd.img\"\n# seed %d\n", seed)),
		"vmlinuz-6.1.62-nvidia-gpu":           blob(1),
		"kata-ubuntu-jammy-nvidia-gpu.initrd": blob(2),
	}
}

// pushTarget is where pushArtifact writes: a repository with optional
// basic auth.
func repository(t testing.TB, host, repo, user, password string) *remote.Repository {
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

// pushArtifact pushes files as an oras artifact (empty config, one titled
// layer per file) and tags it; it returns the manifest descriptor. Titles
// are taken as given, so hostile ones can be pushed too.
func pushArtifact(t testing.TB, r *remote.Repository, tag string, files artifactFiles) ocispec.Descriptor {
	t.Helper()
	ctx := context.Background()
	var layers []ocispec.Descriptor
	for _, name := range sortedKeys(files) {
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

// pushIndex pushes an image index over manifests, one per platform.
func pushIndex(t testing.TB, r *remote.Repository, tag string, byPlatform map[string]ocispec.Descriptor) ocispec.Descriptor {
	t.Helper()
	index := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex}
	for _, p := range sortedKeys(byPlatform) {
		d := byPlatform[p]
		os, arch, _ := strings.Cut(p, "/")
		d.Platform = &ocispec.Platform{OS: os, Architecture: arch}
		index.Manifests = append(index.Manifests, d)
	}
	b, _ := json.Marshal(index)
	desc := content.NewDescriptorFromBytes(ocispec.MediaTypeImageIndex, b)
	if err := r.Push(context.Background(), desc, bytes.NewReader(b)); err != nil {
		t.Fatal(err)
	}
	if err := r.Tag(context.Background(), desc, tag); err != nil {
		t.Fatal(err)
	}
	return desc
}

func sortedKeys[V any](m map[string]V) []string {
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

// faultProxy sits in front of a registry, counts requests and injects the
// faults a test asks for.
type faultProxy struct {
	Host     string
	upstream *url.URL

	mu        sync.Mutex
	failNext  int  // answer this many requests with 500
	corrupt   bool // flip a byte in every blob body
	cutBlobs  int  // drop the connection half-way through this many blob bodies
	stall     bool // send blob headers, then nothing
	manifests atomic.Int64
	blobs     atomic.Int64
	requests  atomic.Int64
	release   chan struct{}
}

func startFaultProxy(t testing.TB, upstreamHost string) *faultProxy {
	t.Helper()
	p := &faultProxy{upstream: &url.URL{Scheme: "http", Host: upstreamHost}, release: make(chan struct{})}
	srv := httptest.NewServer(p)
	t.Cleanup(func() {
		close(p.release)
		srv.CloseClientConnections()
		srv.Close()
	})
	u, _ := url.Parse(srv.URL)
	p.Host = u.Host
	return p
}

func (p *faultProxy) set(f func(p *faultProxy)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f(p)
}

func (p *faultProxy) resetCounts() {
	p.manifests.Store(0)
	p.blobs.Store(0)
	p.requests.Store(0)
}

func (p *faultProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p.requests.Add(1)
	isBlob := strings.Contains(r.URL.Path, "/blobs/sha256:") && r.Method == http.MethodGet
	if strings.Contains(r.URL.Path, "/manifests/") {
		p.manifests.Add(1)
	}
	if isBlob {
		p.blobs.Add(1)
	}
	p.mu.Lock()
	fail := p.failNext > 0
	if fail {
		p.failNext--
	}
	corrupt, stall := p.corrupt, p.stall
	cut := isBlob && p.cutBlobs > 0
	if cut {
		p.cutBlobs--
	}
	p.mu.Unlock()
	if fail {
		http.Error(w, "injected failure", http.StatusInternalServerError)
		return
	}

	req := r.Clone(r.Context())
	req.URL.Scheme, req.URL.Host, req.RequestURI = p.upstream.Scheme, p.upstream.Host, ""
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for k, vs := range resp.Header {
		for _, v := range vs {
			w.Header().Add(k, v)
		}
	}
	if isBlob && resp.StatusCode == http.StatusOK {
		switch {
		case stall:
			w.WriteHeader(resp.StatusCode)
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
			case <-p.release:
			}
			return
		case cut:
			w.WriteHeader(resp.StatusCode)
			w.Write(body[:len(body)/2])
			w.(http.Flusher).Flush()
			if conn, _, err := w.(http.Hijacker).Hijack(); err == nil {
				conn.(*net.TCPConn).SetLinger(0)
				conn.Close() // a reset, mid-body
			}
			return
		case corrupt && len(body) > 0:
			body = bytes.Clone(body)
			body[len(body)/2] ^= 0xff
		}
	}
	w.WriteHeader(resp.StatusCode)
	w.Write(body)
}

func encodeBase64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func newReverseProxy(target *url.URL) http.Handler { return httputil.NewSingleHostReverseProxy(target) }
