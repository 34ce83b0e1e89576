package artifacts

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"
	"oras.land/oras-go/v2/content"
	"oras.land/oras-go/v2/errdef"
	"oras.land/oras-go/v2/registry"
	"oras.land/oras-go/v2/registry/remote"
	"oras.land/oras-go/v2/registry/remote/auth"
	"oras.land/oras-go/v2/registry/remote/credentials"
	"oras.land/oras-go/v2/registry/remote/errcode"
	"oras.land/oras-go/v2/registry/remote/retry"

	"github.com/gpu-sandbox/gpu-sandbox/internal/faultinject"
)

// Sentinel errors, wrapped with the reference and the object concerned.
var (
	ErrInvalidReference = errors.New("invalid reference")
	ErrInvalidOptions   = errors.New("invalid options")
	ErrUnauthorized     = errors.New("unauthorized: check the pull secret")
	ErrNotFound         = errors.New("not found in the registry")
	ErrInvalidArtifact  = errors.New("invalid artifact")
	ErrUnsafeTitle      = errors.New("unsafe file name")
	ErrNoPlatform       = errors.New("no manifest for the platform")
	ErrStalled          = errors.New("download stalled")
)

// Defaults of Options.
const (
	DefaultConcurrency  = 3
	DefaultRetries      = 5
	DefaultStallTimeout = time.Minute
	// MetadataFile is written into every pulled directory.
	MetadataFile = ".artifact.json"
)

// Options tune Pull. The zero value pulls anonymously over HTTPS, for the
// node's platform, three blobs at a time.
type Options struct {
	// DockerConfig is a pull secret's .dockerconfigjson: "auths" keyed by
	// registry, each with "auth" (base64 user:password) or "username" and
	// "password". Docker Hub's entry may be keyed by any of its names, as
	// with the docker CLI: "https://index.docker.io/v1/" (what docker login
	// and kubectl write), "docker.io", "index.docker.io" or
	// "registry-1.docker.io". Nil: anonymous.
	DockerConfig []byte
	// PlainHTTP talks HTTP instead of HTTPS.
	PlainHTTP bool
	// CAFile is a PEM bundle trusted besides the system's roots.
	CAFile string
	// Platform picks the manifest of a multi-platform index, as "os/arch" or
	// "os/arch/variant". Empty: the node's (runtime.GOOS/runtime.GOARCH).
	Platform string
	// Concurrency is how many blobs download at once. Zero or less: DefaultConcurrency.
	Concurrency int
	// Retries is how often a request is retried on 5xx, 429, 408, timeouts
	// and dropped connections, with exponential backoff. Zero: DefaultRetries;
	// negative: none.
	Retries int
	// StallTimeout aborts a blob that receives no byte for this long.
	// Zero: DefaultStallTimeout.
	StallTimeout time.Duration
	// Progress, when set, is called as blobs download: at the start, about
	// every MiB, and at the end of each. It must not block.
	Progress func(Progress)
	// Prepare, when set, is called on a new version before it becomes
	// current: staging is the directory it may add files to, final the path
	// the version will have once current, files the artifact's files. An
	// error abandons the new version and keeps the current one.
	Prepare func(staging, final string, files []File) error
	// Transport replaces the HTTP transport (for tests and proxies); the
	// retry and authentication layers still wrap it. Nil: a clone of
	// http.DefaultTransport.
	Transport http.RoundTripper
}

// Progress reports one blob's download.
type Progress struct {
	Title string
	Done  int64
	Total int64
}

// File is one file of a pulled artifact.
type File struct {
	Name   string        `json:"name"`
	Digest digest.Digest `json:"digest"`
	Size   int64         `json:"size"`
}

// Result describes the artifact in the directory after a Pull.
type Result struct {
	// Reference is the reference pulled, with the tag made explicit.
	Reference string `json:"reference"`
	// Digest is the manifest (or index) digest the reference resolved to.
	Digest digest.Digest `json:"digest"`
	// Manifest is the digest of the platform manifest (Digest unless the
	// reference names an index).
	Manifest digest.Digest `json:"manifest"`
	Files    []File        `json:"files"`
	// Changed is false when the directory already held this digest.
	Changed bool `json:"-"`
	// Path is the directory the link resolves to.
	Path string `json:"-"`
}

// ParseReference parses an artifact reference. A reference without tag or
// digest means the tag "latest", as with docker pull. Docker Hub references
// are named as the docker CLI names them: "index.docker.io" is "docker.io",
// and a repository of one part there is an official one under "library/".
func ParseReference(ref string) (registry.Reference, error) {
	r, err := registry.ParseReference(ref)
	if err != nil {
		return registry.Reference{}, fmt.Errorf("%w %q: %w", ErrInvalidReference, ref, err)
	}
	if r.Reference == "" {
		r.Reference = "latest"
	}
	// oras-go sends "docker.io" to registry-1.docker.io but would send
	// "index.docker.io" to a host of that name; and "docker.io/ubuntu" names
	// nothing on Docker Hub, which only knows "library/ubuntu".
	if r.Registry == "index.docker.io" {
		r.Registry = "docker.io"
	}
	if r.Registry == "docker.io" && !strings.Contains(r.Repository, "/") {
		r.Repository = "library/" + r.Repository
	}
	return r, nil
}

// Current reads the artifact recorded in dir by an earlier Pull.
func Current(dir string) (*Result, error) {
	b, err := os.ReadFile(filepath.Join(dir, MetadataFile))
	if err != nil {
		return nil, fmt.Errorf("read artifact in %q: %w", dir, err)
	}
	var r Result
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("read artifact in %q: %s is corrupt: %w", dir, MetadataFile, err)
	}
	if r.Path, err = filepath.EvalSymlinks(dir); err != nil {
		return nil, fmt.Errorf("read artifact in %q: %w", dir, err)
	}
	return &r, nil
}

// intact reports whether every recorded file is still there, whole.
func (r *Result) intact() bool {
	for _, f := range r.Files {
		fi, err := os.Lstat(filepath.Join(r.Path, f.Name))
		if err != nil || !fi.Mode().IsRegular() || fi.Size() != f.Size {
			return false
		}
	}
	return len(r.Files) > 0
}

// Pull makes dir hold the artifact ref names. dir is a symbolic link that
// Pull creates or replaces; the files live in a sibling directory
// .<name>.versions/<digest>, of which the current and the previous one are
// kept so that a reader that resolved the old link finishes with old files.
// Pulls into one dir, in this process or another, take turns: each holds an
// flock on the versions directory from start to end, and one that waits
// gives up when ctx ends.
func Pull(ctx context.Context, ref, dir string, opts Options) (*Result, error) {
	r, err := ParseReference(ref)
	if err != nil {
		return nil, err
	}
	p, err := newPuller(r, dir, opts)
	if err != nil {
		return nil, fmt.Errorf("pull %s: %w", r, err)
	}
	res, err := p.pull(ctx)
	if err != nil {
		return nil, fmt.Errorf("pull %s: %w", r, explain(err))
	}
	return res, nil
}

type puller struct {
	ref      registry.Reference
	repo     *remote.Repository
	dir      string
	versions string // .<name>.versions beside dir
	opts     Options
	platform ocispec.Platform
}

func newPuller(r registry.Reference, dir string, opts Options) (*puller, error) {
	if opts.Concurrency <= 0 {
		opts.Concurrency = DefaultConcurrency
	}
	if opts.Retries == 0 {
		opts.Retries = DefaultRetries
	}
	if opts.StallTimeout <= 0 {
		opts.StallTimeout = DefaultStallTimeout
	}
	platform, err := parsePlatform(opts.Platform)
	if err != nil {
		return nil, err
	}
	repo, err := remote.NewRepository(r.String())
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidReference, err)
	}
	repo.PlainHTTP = opts.PlainHTTP
	client, err := httpClient(opts)
	if err != nil {
		return nil, err
	}
	repo.Client = client
	dir = filepath.Clean(dir)
	return &puller{
		ref: r, repo: repo, dir: dir, opts: opts, platform: platform,
		versions: filepath.Join(filepath.Dir(dir), "."+filepath.Base(dir)+".versions"),
	}, nil
}

func parsePlatform(s string) (ocispec.Platform, error) {
	if s == "" {
		return ocispec.Platform{OS: runtime.GOOS, Architecture: runtime.GOARCH}, nil
	}
	parts := strings.Split(s, "/")
	if len(parts) < 2 || len(parts) > 3 || parts[0] == "" || parts[1] == "" {
		return ocispec.Platform{}, fmt.Errorf("%w: platform %q: want os/arch[/variant]", ErrInvalidOptions, s)
	}
	p := ocispec.Platform{OS: parts[0], Architecture: parts[1]}
	if len(parts) == 3 {
		p.Variant = parts[2]
	}
	return p, nil
}

func httpClient(opts Options) (*auth.Client, error) {
	base := opts.Transport
	if base == nil {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.ResponseHeaderTimeout = 30 * time.Second
		t.DialContext = (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext
		if opts.CAFile != "" {
			pem, err := os.ReadFile(opts.CAFile)
			if err != nil {
				return nil, fmt.Errorf("%w: CA file: %w", ErrInvalidOptions, err)
			}
			pool, err := x509.SystemCertPool()
			if err != nil {
				pool = x509.NewCertPool()
			}
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("%w: CA file %q holds no PEM certificate", ErrInvalidOptions, opts.CAFile)
			}
			t.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
		}
		base = t
	}
	rt := http.RoundTripper(base)
	if opts.Retries > 0 {
		policy := *retry.DefaultPolicy.(*retry.GenericPolicy)
		policy.MaxRetry = opts.Retries
		rt = &retry.Transport{Base: base, Policy: func() retry.Policy { return &policy }}
	}
	client := &auth.Client{Client: &http.Client{Transport: rt}, Cache: auth.NewCache()}
	client.SetUserAgent("gpu-sandbox")
	if opts.DockerConfig != nil {
		store, err := credentials.NewMemoryStoreFromDockerConfig(opts.DockerConfig)
		if err != nil {
			// The parser's message may quote the secret: name the cause only.
			return nil, fmt.Errorf("%w: the pull secret is not a valid dockerconfigjson", ErrInvalidOptions)
		}
		client.Credential = credential(store)
	}
	return client, nil
}

// credential looks up the pull secret's entry for the host a request goes
// to. Docker Hub is one registry under several names, and oras-go's own
// lookup never finds its entry: the store keeps the docker CLI's key
// "https://index.docker.io/v1/" as "index.docker.io", while
// credentials.Credential asks it for "https://index.docker.io/v1/" when a
// request goes to registry-1.docker.io. So every Docker Hub name is tried
// for every Docker Hub host, the docker CLI's key first.
func credential(store credentials.Store) auth.CredentialFunc {
	return func(ctx context.Context, hostport string) (auth.Credential, error) {
		if !dockerHub(hostport) {
			return store.Get(ctx, hostport)
		}
		// The first two are one key, before and after the store's
		// normalisation: a later oras-go may keep it as written.
		for _, key := range []string{"https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io"} {
			cred, err := store.Get(ctx, key)
			if err != nil || cred != auth.EmptyCredential {
				return cred, err
			}
		}
		return auth.EmptyCredential, nil
	}
}

// dockerHub reports whether host is one of Docker Hub's names.
func dockerHub(host string) bool {
	switch host {
	case "docker.io", "index.docker.io", "registry-1.docker.io":
		return true
	}
	return false
}

func (p *puller) pull(ctx context.Context) (*Result, error) {
	if err := os.MkdirAll(p.versions, 0o755); err != nil {
		return nil, err
	}
	// Everything is written below the versions directory: a link planted
	// there would carry the writes out of the artifacts directory.
	if fi, err := os.Lstat(p.versions); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("%w: %q is not a directory (a symbolic link?)", ErrUnsafeTitle, p.versions)
	}
	unlock, err := p.lock(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	// Under the lock, a staging directory is no other pull's work in
	// progress but what an interrupted one left.
	p.clean()

	// One request: what does the reference name now?
	root, err := p.repo.Resolve(ctx, p.ref.Reference)
	if err != nil {
		return nil, err
	}
	if p.ref.ValidateReferenceAsDigest() == nil && root.Digest.String() != p.ref.Reference {
		return nil, fmt.Errorf("registry answered %s for pinned digest %s", root.Digest, p.ref.Reference)
	}
	if cur, err := Current(p.dir); err == nil && cur.Digest == root.Digest && cur.intact() {
		cur.Changed = false
		return cur, nil
	}

	manifestDesc, manifest, err := p.manifest(ctx, root)
	if err != nil {
		return nil, err
	}
	files, err := layers(manifest)
	if err != nil {
		return nil, err
	}
	res := &Result{Reference: p.ref.String(), Digest: root.Digest, Manifest: manifestDesc.Digest, Changed: true}

	final := filepath.Join(p.versions, root.Digest.Encoded())
	if _, err := os.Stat(filepath.Join(final, MetadataFile)); err != nil {
		staging, err := os.MkdirTemp(p.versions, ".staging-")
		if err != nil {
			return nil, err
		}
		if err := p.download(ctx, staging, files); err != nil {
			os.RemoveAll(staging)
			return nil, err
		}
		for _, l := range files {
			res.Files = append(res.Files, File{Name: l.Annotations[ocispec.AnnotationTitle], Digest: l.Digest, Size: l.Size})
		}
		if p.opts.Prepare != nil {
			if err := p.opts.Prepare(staging, final, res.Files); err != nil {
				os.RemoveAll(staging)
				return nil, fmt.Errorf("prepare %s: %w", root.Digest, err)
			}
		}
		if err := writeMetadata(staging, res); err != nil {
			os.RemoveAll(staging)
			return nil, err
		}
		os.RemoveAll(final) // a version dir without metadata is debris
		faultinject.Point("artifacts: staged " + final)
		if err := os.Rename(staging, final); err != nil {
			os.RemoveAll(staging)
			return nil, err
		}
		if err := syncDir(p.versions); err != nil {
			return nil, err
		}
	} else if old, err := readMetadata(final); err == nil {
		res.Files = old.Files
	}
	if err := p.swap(final); err != nil {
		return nil, err
	}
	res.Path = final
	p.prune(final)
	return res, nil
}

// manifest fetches the manifest root names, choosing the platform's from an
// index.
func (p *puller) manifest(ctx context.Context, root ocispec.Descriptor) (ocispec.Descriptor, *ocispec.Manifest, error) {
	b, err := content.FetchAll(ctx, p.repo, root)
	if err != nil {
		return root, nil, fmt.Errorf("fetch manifest %s: %w", root.Digest, err)
	}
	switch root.MediaType {
	case ocispec.MediaTypeImageIndex, "application/vnd.docker.distribution.manifest.list.v2+json":
		var index ocispec.Index
		if err := json.Unmarshal(b, &index); err != nil {
			return root, nil, fmt.Errorf("%w: index %s: %w", ErrInvalidArtifact, root.Digest, err)
		}
		for _, m := range index.Manifests {
			if m.Platform != nil && m.Platform.OS == p.platform.OS && m.Platform.Architecture == p.platform.Architecture &&
				(p.platform.Variant == "" || m.Platform.Variant == p.platform.Variant) {
				return p.manifest(ctx, m)
			}
		}
		return root, nil, fmt.Errorf("%w %s/%s in index %s", ErrNoPlatform, p.platform.OS, p.platform.Architecture, root.Digest)
	case ocispec.MediaTypeImageManifest, "application/vnd.docker.distribution.manifest.v2+json":
		var m ocispec.Manifest
		if err := json.Unmarshal(b, &m); err != nil {
			return root, nil, fmt.Errorf("%w: manifest %s: %w", ErrInvalidArtifact, root.Digest, err)
		}
		return root, &m, nil
	}
	return root, nil, fmt.Errorf("%w: %s is a %q, not a manifest", ErrInvalidArtifact, root.Digest, root.MediaType)
}

// layers returns the manifest's file layers, refusing names that would
// leave the directory and layers that are directories.
func layers(m *ocispec.Manifest) ([]ocispec.Descriptor, error) {
	var files []ocispec.Descriptor
	seen := map[string]bool{}
	for _, l := range m.Layers {
		name, ok := l.Annotations[ocispec.AnnotationTitle]
		if !ok {
			continue // not a file
		}
		if !filepath.IsLocal(name) || strings.HasPrefix(filepath.Base(name), ".") || strings.ContainsRune(name, '\\') {
			return nil, fmt.Errorf("%w: layer %s is titled %q", ErrUnsafeTitle, l.Digest, name)
		}
		if l.Annotations["io.deis.oras.content.unpack"] == "true" {
			return nil, fmt.Errorf("%w: layer %q is a packed directory; only files are supported", ErrInvalidArtifact, name)
		}
		if seen[filepath.Clean(name)] {
			return nil, fmt.Errorf("%w: two layers are titled %q", ErrInvalidArtifact, name)
		}
		seen[filepath.Clean(name)] = true
		if err := l.Digest.Validate(); err != nil || l.Size < 0 {
			return nil, fmt.Errorf("%w: layer %q has digest %q and size %d", ErrInvalidArtifact, name, l.Digest, l.Size)
		}
		files = append(files, l)
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("%w: no layer has a file name (org.opencontainers.image.title)", ErrInvalidArtifact)
	}
	return files, nil
}

// download fetches the layers into dir, some at a time, each verified
// against its digest and synced.
func (p *puller) download(ctx context.Context, dir string, files []ocispec.Descriptor) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sem := make(chan struct{}, p.opts.Concurrency)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	for _, l := range files {
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return
			}
			defer func() { <-sem }()
			if err := p.fetchRetrying(ctx, dir, l); err != nil {
				mu.Lock()
				if first == nil {
					first = err
					cancel()
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if first != nil {
		return first
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return syncDir(dir)
}

// fetchRetrying fetches a blob, starting over when the connection breaks or
// stalls mid-body (the retrying transport covers only failed requests).
func (p *puller) fetchRetrying(ctx context.Context, dir string, l ocispec.Descriptor) error {
	delay := 250 * time.Millisecond
	for attempt := 0; ; attempt++ {
		err := p.fetch(ctx, dir, l)
		if err == nil || attempt >= p.opts.Retries || !transient(err) || ctx.Err() != nil {
			return err
		}
		os.Remove(filepath.Join(dir, l.Annotations[ocispec.AnnotationTitle]))
		select {
		case <-ctx.Done():
			return err
		case <-time.After(delay):
		}
		delay = min(2*delay, 3*time.Second)
	}
}

// transient reports whether a failed blob download may succeed if tried
// again: a dropped connection or a stall, not a wrong digest.
func transient(err error) bool {
	var ne net.Error
	return errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, ErrStalled) || (errors.As(err, &ne) && ne.Timeout())
}

func (p *puller) fetch(ctx context.Context, dir string, l ocispec.Descriptor) (err error) {
	name := l.Annotations[ocispec.AnnotationTitle]
	path := filepath.Join(dir, name)
	defer func() {
		if err != nil {
			err = fmt.Errorf("blob %s (%s): %w", name, l.Digest, err)
		}
	}()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	rc, err := p.repo.Fetch(ctx, l)
	if err != nil {
		return err
	}
	defer rc.Close()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()

	w := &watch{p: p.opts.Progress, title: name, total: l.Size, kick: make(chan struct{}, 1)}
	go w.guard(ctx, cancel, p.opts.StallTimeout)
	w.report()
	vr := content.NewVerifyReader(io.TeeReader(rc, w), l)
	buf := make([]byte, 1<<20)
	if _, err := io.CopyBuffer(&writeBehind{f: f}, vr, buf); err != nil {
		if cause := context.Cause(ctx); errors.Is(cause, ErrStalled) {
			return cause
		}
		return err
	}
	if err := vr.Verify(); err != nil {
		return err
	}
	w.final()
	faultinject.Point("artifacts: blob written " + name)
	if err := f.Sync(); err != nil {
		return err
	}
	return f.Close()
}

// writeBehind starts writing each few MiB to disk while the download goes
// on, so that the fsync before the swap finds little left to do: the
// durability costs no time at the end.
type writeBehind struct {
	f       *os.File
	off     int64
	flushed int64
}

const writeBehindChunk = 8 << 20

func (w *writeBehind) Write(p []byte) (int, error) {
	n, err := w.f.Write(p)
	w.off += int64(n)
	if w.off-w.flushed >= writeBehindChunk {
		// Asynchronous: it queues the range for writeback and returns.
		_ = unix.SyncFileRange(int(w.f.Fd()), w.flushed, w.off-w.flushed, unix.SYNC_FILE_RANGE_WRITE)
		w.flushed = w.off
	}
	return n, err
}

// watch counts bytes for progress reports and for the stall guard.
type watch struct {
	p     func(Progress)
	title string
	total int64
	done  int64
	last  int64
	kick  chan struct{}
}

func (w *watch) Write(b []byte) (int, error) {
	w.done += int64(len(b))
	select {
	case w.kick <- struct{}{}:
	default:
	}
	if w.done-w.last >= 1<<20 {
		w.report()
	}
	return len(b), nil
}

func (w *watch) report() {
	w.last = w.done
	if w.p != nil {
		w.p(Progress{Title: w.title, Done: w.done, Total: w.total})
	}
}

func (w *watch) final() {
	if w.last != w.done || w.done == 0 {
		w.report()
	}
}

// guard cancels the download when no byte arrives for timeout.
func (w *watch) guard(ctx context.Context, cancel context.CancelCauseFunc, timeout time.Duration) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.kick:
			t.Reset(timeout)
		case <-t.C:
			cancel(fmt.Errorf("%w: no data for %s", ErrStalled, timeout))
			return
		}
	}
}

func writeMetadata(dir string, r *Result) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(dir, MetadataFile), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return syncDir(dir)
}

func readMetadata(dir string) (*Result, error) {
	b, err := os.ReadFile(filepath.Join(dir, MetadataFile))
	if err != nil {
		return nil, err
	}
	var r Result
	return &r, json.Unmarshal(b, &r)
}

// swap points the link at final in one rename. A directory left at the
// link's place by an older tool is moved into the versions directory first.
func (p *puller) swap(final string) error {
	rel, err := filepath.Rel(filepath.Dir(p.dir), final)
	if err != nil {
		return err
	}
	if fi, err := os.Lstat(p.dir); err == nil && fi.Mode()&os.ModeSymlink == 0 {
		if err := os.Rename(p.dir, filepath.Join(p.versions, fmt.Sprintf("previous-%d", time.Now().UnixNano()))); err != nil {
			return fmt.Errorf("move aside %q, which is not a link: %w", p.dir, err)
		}
	}
	tmp := filepath.Join(p.versions, ".link-"+filepath.Base(final))
	_ = os.Remove(tmp)
	if err := os.Symlink(rel, tmp); err != nil {
		return err
	}
	faultinject.Point("artifacts: link made for " + p.dir)
	if err := os.Rename(tmp, p.dir); err != nil {
		os.Remove(tmp)
		return err
	}
	return syncDir(filepath.Dir(p.dir))
}

// lock takes an exclusive flock on the versions directory, for which other
// pulls into the same dir wait: without it one pull's clean removes the
// other's staging directory mid-download. The lock is on the open file, so
// it ends with the process too, and a crashed pull never blocks the next.
func (p *puller) lock(ctx context.Context) (unlock func(), err error) {
	// O_NOFOLLOW: a link swapped in after the check above is not followed.
	fd, err := unix.Open(p.versions, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("lock %q: %w", p.versions, err)
	}
	// Polled rather than blocking, so that the wait ends with ctx: a
	// blocked flock cannot be interrupted.
	delay := 5 * time.Millisecond
	for {
		err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { unix.Close(fd) }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			unix.Close(fd)
			return nil, fmt.Errorf("lock %q: %w", p.versions, err)
		}
		select {
		case <-ctx.Done():
			unix.Close(fd)
			return nil, fmt.Errorf("wait for another pull into %q: %w", p.dir, context.Cause(ctx))
		case <-time.After(delay):
		}
		delay = min(2*delay, 200*time.Millisecond)
	}
}

// clean removes what interrupted pulls left: staging directories and links.
func (p *puller) clean() {
	entries, _ := os.ReadDir(p.versions)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".staging-") || strings.HasPrefix(e.Name(), ".link-") {
			os.RemoveAll(filepath.Join(p.versions, e.Name()))
		}
	}
}

// prune keeps the current version and the one before it.
func (p *puller) prune(current string) {
	entries, err := os.ReadDir(p.versions)
	if err != nil {
		return
	}
	type version struct {
		name string
		mod  time.Time
	}
	var old []version
	for _, e := range entries {
		path := filepath.Join(p.versions, e.Name())
		if path == current || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		if fi, err := e.Info(); err == nil {
			old = append(old, version{e.Name(), fi.ModTime()})
		}
	}
	slices.SortFunc(old, func(a, b version) int { return b.mod.Compare(a.mod) })
	for i, v := range old {
		if i >= 1 {
			os.RemoveAll(filepath.Join(p.versions, v.name))
		}
	}
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// explain turns registry errors into the package's sentinels, keeping the
// registry's message.
func explain(err error) error {
	var resp *errcode.ErrorResponse
	if errors.As(err, &resp) {
		switch resp.StatusCode {
		case http.StatusUnauthorized, http.StatusForbidden:
			host := ""
			if resp.URL != nil {
				host = " from " + resp.URL.Host
			}
			return fmt.Errorf("%w (%d%s)", ErrUnauthorized, resp.StatusCode, host)
		case http.StatusNotFound:
			return fmt.Errorf("%w: %w", ErrNotFound, err)
		}
	}
	if errors.Is(err, auth.ErrBasicCredentialNotFound) {
		return fmt.Errorf("%w: the registry asks for credentials and the pull secret has none for it", ErrUnauthorized)
	}
	if errors.Is(err, errdef.ErrNotFound) {
		return fmt.Errorf("%w: %w", ErrNotFound, err)
	}
	return err
}
