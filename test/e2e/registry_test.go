package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/gpu-sandbox/gpu-sandbox/test/e2e/testbed"

	_ "github.com/distribution/distribution/v3/registry/auth/htpasswd"
	_ "github.com/distribution/distribution/v3/registry/storage/driver/inmemory"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2/content"
	"oras.land/oras-go/v2/registry/remote"
)

// pushIndex pushes an image index over manifests, one per platform.
func pushIndex(t testing.TB, r *remote.Repository, tag string, byPlatform map[string]ocispec.Descriptor) ocispec.Descriptor {
	t.Helper()
	index := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex}
	for _, p := range testbed.SortedKeys(byPlatform) {
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

// faultProxy sits in front of a registry, counts requests and injects the
// faults a test asks for.
type faultProxy struct {
	Host     string
	upstream *url.URL

	mu        sync.Mutex
	failNext  int    // answer this many requests with 500
	corrupt   bool   // flip a byte in every blob body
	cutBlobs  int    // drop the connection half-way through this many blob bodies
	stall     bool   // send blob headers, then nothing
	manifest  string // "truncate" or "oversize" every manifest body
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
	corrupt, stall, manifest := p.corrupt, p.stall, p.manifest
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
	if strings.Contains(r.URL.Path, "/manifests/") && r.Method == http.MethodGet && resp.StatusCode == http.StatusOK {
		switch manifest {
		case "truncate":
			body = body[:len(body)/2]
		case "oversize": // 5 MiB of trailing white space: still JSON, far past any manifest
			body = append(bytes.Clone(body), bytes.Repeat([]byte(" "), 5<<20)...)
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
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
