package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/pem"
	"errors"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gpu-sandbox/gpu-sandbox/test/e2e/testbed"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/artifacts"
)

// checkFiles compares the files in dir with want, byte for byte.
func checkFiles(t *testing.T, dir string, want testbed.Files) {
	t.Helper()
	for name, data := range want {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if !bytes.Equal(got, data) {
			t.Errorf("%s: %d bytes differ from the %d pushed", name, len(got), len(data))
		}
	}
}

// noDebris fails if a staging directory or link is left beside dir.
func noDebris(t *testing.T, dir string) {
	t.Helper()
	entries, _ := os.ReadDir(filepath.Join(filepath.Dir(dir), "."+filepath.Base(dir)+".versions"))
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") {
			t.Errorf("debris left: %s", e.Name())
		}
	}
}

func plain() artifacts.Options { return artifacts.Options{PlainHTTP: true, Retries: 2} }

func TestPullColdWarmAndMovedTag(t *testing.T) {
	reg := testbed.StartRegistry(t, "", "")
	proxy := startFaultProxy(t, reg.Host)
	repo := testbed.Repository(t, reg.Host, "nvidia/kata-gpu-artifacts", "", "")
	v1 := testbed.KataArtifact(1, 3<<20)
	desc := testbed.PushArtifact(t, repo, "ubuntu22.04-535", v1)
	dir := filepath.Join(t.TempDir(), "kata-qemu-nvidia-gpu")
	ref := proxy.Host + "/nvidia/kata-gpu-artifacts:ubuntu22.04-535"

	var mu sync.Mutex
	progress := map[string]artifacts.Progress{}
	opts := plain()
	opts.Progress = func(p artifacts.Progress) {
		mu.Lock()
		progress[p.Title] = p
		mu.Unlock()
	}
	res, err := artifacts.Pull(context.Background(), ref, dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Changed || res.Digest != desc.Digest || len(res.Files) != 3 {
		t.Fatalf("cold pull: %+v", res)
	}
	checkFiles(t, dir, v1)
	for name, data := range v1 {
		if p := progress[name]; p.Done != int64(len(data)) || p.Total != int64(len(data)) {
			t.Errorf("last progress for %s: %+v", name, p)
		}
	}
	if cur, err := artifacts.Current(dir); err != nil || cur.Digest != desc.Digest {
		t.Errorf("recorded digest: %v %v", cur, err)
	}

	// Warm: one manifest request, no blob.
	proxy.resetCounts()
	res, err = artifacts.Pull(context.Background(), ref, dir, plain())
	if err != nil || res.Changed {
		t.Fatalf("warm pull: %+v %v", res, err)
	}
	if m, b := proxy.manifests.Load(), proxy.blobs.Load(); m != 1 || b != 0 {
		t.Errorf("warm pull made %d manifest and %d blob requests; want 1 and 0", m, b)
	}

	// The tag moves: the new set replaces the old in one rename, the old
	// version stays for readers that resolved it.
	old, _ := filepath.EvalSymlinks(dir)
	v2 := testbed.KataArtifact(2, 1<<20)
	desc2 := testbed.PushArtifact(t, repo, "ubuntu22.04-535", v2)
	res, err = artifacts.Pull(context.Background(), ref, dir, plain())
	if err != nil || !res.Changed || res.Digest != desc2.Digest {
		t.Fatalf("pull after the tag moved: %+v %v", res, err)
	}
	checkFiles(t, dir, v2)
	if _, err := os.Stat(filepath.Join(old, "vmlinuz-6.1.62-nvidia-gpu")); err != nil {
		t.Errorf("previous version removed at once: %v", err)
	}
	noDebris(t, dir)

	// A pinned digest pulls that content; one the registry does not serve is an error.
	if res, err := artifacts.Pull(context.Background(), proxy.Host+"/nvidia/kata-gpu-artifacts@"+desc.Digest.String(), dir, plain()); err != nil || res.Digest != desc.Digest {
		t.Fatalf("pull by digest: %+v %v", res, err)
	}
	checkFiles(t, dir, v1)
	missing := "sha256:" + strings.Repeat("ab", 32)
	_, err = artifacts.Pull(context.Background(), proxy.Host+"/nvidia/kata-gpu-artifacts@"+missing, dir, plain())
	if !errors.Is(err, artifacts.ErrNotFound) || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing digest: %v", err)
	}
	checkFiles(t, dir, v1)
}

func TestPullReferences(t *testing.T) {
	reg := testbed.StartRegistry(t, "", "")
	repo := testbed.Repository(t, reg.Host, "kata", "", "")
	files := testbed.KataArtifact(3, 4096)
	testbed.PushArtifact(t, repo, "latest", files)
	dir := filepath.Join(t.TempDir(), "rc")
	// host:port/repo without a tag means latest.
	res, err := artifacts.Pull(context.Background(), reg.Host+"/kata", dir, plain())
	if err != nil || !strings.HasSuffix(res.Reference, "/kata:latest") {
		t.Fatalf("pull without tag: %+v %v", res, err)
	}
	checkFiles(t, dir, files)
	for _, bad := range []string{"", reg.Host + "/UPPER:tag", "host:port/repo", reg.Host + "/kata:bad tag", reg.Host + "/kata@sha256:short"} {
		if _, err := artifacts.Pull(context.Background(), bad, dir, plain()); !errors.Is(err, artifacts.ErrInvalidReference) {
			t.Errorf("reference %q: %v; want ErrInvalidReference", bad, err)
		}
	}
}

func TestPullRetriesServerErrors(t *testing.T) {
	reg := testbed.StartRegistry(t, "", "")
	proxy := startFaultProxy(t, reg.Host)
	testbed.PushArtifact(t, testbed.Repository(t, reg.Host, "kata", "", ""), "v1", testbed.KataArtifact(4, 1<<20))
	proxy.set(func(p *faultProxy) { p.failNext = 3 })
	dir := filepath.Join(t.TempDir(), "rc")
	opts := plain()
	opts.Retries = 5
	if _, err := artifacts.Pull(context.Background(), proxy.Host+"/kata:v1", dir, opts); err != nil {
		t.Fatalf("pull through three 500s: %v", err)
	}
	if proxy.failNext != 0 {
		t.Error("the injected failures were not all met")
	}
}

// Faults during a pull leave the previous artifact in place and no debris,
// and the error names the reference and the cause.
func TestPullFaultsKeepPreviousContent(t *testing.T) {
	t.Run("distribution v3 in process", func(t *testing.T) {
		pullFaults(t, testbed.StartRegistry(t, "", "").Host)
	})
	t.Run("Debian's docker-registry", func(t *testing.T) {
		pullFaults(t, testbed.StartDockerRegistry(t).Host)
	})
}

// pullFaults puts a fault-injecting proxy in front of the registry at host.
func pullFaults(t *testing.T, host string) {
	proxy := startFaultProxy(t, host)
	repo := testbed.Repository(t, host, "kata", "", "")
	v1 := testbed.KataArtifact(5, 1<<20)
	testbed.PushArtifact(t, repo, "v", v1)
	dir := filepath.Join(t.TempDir(), "rc")
	ref := proxy.Host + "/kata:v"
	if _, err := artifacts.Pull(context.Background(), ref, dir, plain()); err != nil {
		t.Fatal(err)
	}
	testbed.PushArtifact(t, repo, "v", testbed.KataArtifact(6, 1<<20))

	for _, tc := range []struct {
		name  string
		fault func(p *faultProxy)
		opts  func(o *artifacts.Options)
		want  string
	}{
		{"corrupt blob", func(p *faultProxy) { p.corrupt = true }, nil, "digest"},
		{"connection reset mid-blob, every time", func(p *faultProxy) { p.cutBlobs = 100 }, nil, "blob"},
		{"500 storm", func(p *faultProxy) { p.failNext = 1000 }, nil, "500"},
		{"stall", func(p *faultProxy) { p.stall = true }, func(o *artifacts.Options) { o.StallTimeout = 200 * time.Millisecond }, "stalled"},
		{"truncated manifest", func(p *faultProxy) { p.manifest = "truncate" }, nil, "manifest"},
		{"oversized manifest", func(p *faultProxy) { p.manifest = "oversize" }, nil, "manifest"},
		{"registry unreachable", nil, nil, "connect"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ref := ref
			if tc.fault == nil {
				ref = "127.0.0.1:1/kata:v"
			} else {
				proxy.set(tc.fault)
				defer proxy.set(func(p *faultProxy) { p.corrupt, p.cutBlobs, p.failNext, p.stall, p.manifest = false, 0, 0, false, "" })
			}
			opts := plain()
			if tc.opts != nil {
				tc.opts(&opts)
			}
			_, err := artifacts.Pull(context.Background(), ref, dir, opts)
			if err == nil || !strings.Contains(err.Error(), ref) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v; want one naming %s and %q", err, ref, tc.want)
			}
			checkFiles(t, dir, v1)
			if _, err := artifacts.Pull(context.Background(), "127.0.0.1:1/none:x", filepath.Join(filepath.Dir(dir), "other"), artifacts.Options{PlainHTTP: true, Retries: -1}); err == nil {
				t.Fatal("pull from a closed port succeeded")
			}
		})
	}
	// A pull that was cut short left staging files; the next pull removes them.
	proxy.set(func(p *faultProxy) { p.cutBlobs = 1 })
	if _, err := artifacts.Pull(context.Background(), ref, dir, artifacts.Options{PlainHTTP: true, Retries: -1}); err == nil {
		t.Fatal("pull with a reset and no retries succeeded")
	}
	staging := filepath.Join(filepath.Dir(dir), ".rc.versions", ".staging-leftover")
	if err := os.MkdirAll(staging, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := artifacts.Pull(context.Background(), ref, dir, plain()); err != nil {
		t.Fatal(err)
	}
	noDebris(t, dir)
}

// A reset mid-blob is retried as a whole blob.
func TestPullRetriesCutBlob(t *testing.T) {
	reg := testbed.StartRegistry(t, "", "")
	proxy := startFaultProxy(t, reg.Host)
	files := testbed.KataArtifact(7, 2<<20)
	testbed.PushArtifact(t, testbed.Repository(t, reg.Host, "kata", "", ""), "v", files)
	proxy.set(func(p *faultProxy) { p.cutBlobs = 2 })
	dir := filepath.Join(t.TempDir(), "rc")
	if _, err := artifacts.Pull(context.Background(), proxy.Host+"/kata:v", dir, plain()); err != nil {
		t.Fatalf("pull through two resets: %v", err)
	}
	checkFiles(t, dir, files)
}

func TestPullCredentials(t *testing.T) {
	const user, password = "puller", "s3cret-Pa55word"
	reg := testbed.StartRegistry(t, user, password)
	files := testbed.KataArtifact(8, 4096)
	testbed.PushArtifact(t, testbed.Repository(t, reg.Host, "private/kata", user, password), "v", files)
	ref := reg.Host + "/private/kata:v"
	b64 := func(s string) string { return encodeBase64(s) }
	for _, tc := range []struct {
		name   string
		config string
		ok     bool
	}{
		{"auth field", `{"auths":{"` + reg.Host + `":{"auth":"` + b64(user+":"+password) + `"}}}`, true},
		{"username and password", `{"auths":{"http://` + reg.Host + `":{"username":"` + user + `","password":"` + password + `"}}}`, true},
		{"wrong password", `{"auths":{"` + reg.Host + `":{"auth":"` + b64(user+":wrong-"+password) + `"}}}`, false},
		{"no credentials", `{"auths":{}}`, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "rc")
			opts := plain()
			opts.DockerConfig = []byte(tc.config)
			_, err := artifacts.Pull(context.Background(), ref, dir, opts)
			if tc.ok {
				if err != nil {
					t.Fatal(err)
				}
				checkFiles(t, dir, files)
				return
			}
			if !errors.Is(err, artifacts.ErrUnauthorized) {
				t.Fatalf("error %v; want ErrUnauthorized", err)
			}
			if strings.Contains(err.Error(), password) || strings.Contains(err.Error(), b64(user+":wrong-"+password)) {
				t.Errorf("the error shows the secret: %v", err)
			}
		})
	}
	opts := plain()
	opts.DockerConfig = []byte(`{"auths": {"x": {"auth": "` + password + `"}}`)
	_, err := artifacts.Pull(context.Background(), ref, t.TempDir()+"/rc", opts)
	if !errors.Is(err, artifacts.ErrInvalidOptions) || strings.Contains(err.Error(), password) {
		t.Errorf("malformed pull secret: %v", err)
	}
}

func TestPullRefusesUnsafeTitles(t *testing.T) {
	reg := testbed.StartRegistry(t, "", "")
	proxy := startFaultProxy(t, reg.Host)
	repo := testbed.Repository(t, reg.Host, "evil", "", "")
	root := t.TempDir()
	for _, title := range []string{"../../etc/passwd", "/etc/shadow", "a/../../b", ".artifact.json", ".hidden"} {
		t.Run(title, func(t *testing.T) {
			testbed.PushArtifact(t, repo, "t", testbed.Files{"ok.toml": []byte("x"), title: []byte("pwned")})
			proxy.resetCounts()
			dir := filepath.Join(root, "sub", "rc")
			_, err := artifacts.Pull(context.Background(), proxy.Host+"/evil:t", dir, plain())
			if !errors.Is(err, artifacts.ErrUnsafeTitle) || !strings.Contains(err.Error(), title) {
				t.Fatalf("error %v; want ErrUnsafeTitle naming %q", err, title)
			}
			if n := proxy.blobs.Load(); n != 0 {
				t.Errorf("%d blobs downloaded before the title was refused", n)
			}
		})
	}
	var found []string
	filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			found = append(found, p)
		}
		return nil
	})
	if len(found) != 0 {
		t.Errorf("files written: %v", found)
	}
}

func TestPullPicksPlatformFromIndex(t *testing.T) {
	reg := testbed.StartRegistry(t, "", "")
	repo := testbed.Repository(t, reg.Host, "multi", "", "")
	amd, arm := testbed.KataArtifact(10, 4096), testbed.KataArtifact(11, 4096)
	pushIndex(t, repo, "v", map[string]ocispec.Descriptor{
		"linux/amd64": testbed.PushArtifact(t, repo, "", amd),
		"linux/arm64": testbed.PushArtifact(t, repo, "", arm),
	})
	for platform, want := range map[string]testbed.Files{"linux/amd64": amd, "linux/arm64": arm} {
		dir := filepath.Join(t.TempDir(), "rc")
		opts := plain()
		opts.Platform = platform
		if _, err := artifacts.Pull(context.Background(), reg.Host+"/multi:v", dir, opts); err != nil {
			t.Fatalf("%s: %v", platform, err)
		}
		checkFiles(t, dir, want)
	}
	opts := plain()
	opts.Platform = "linux/s390x"
	if _, err := artifacts.Pull(context.Background(), reg.Host+"/multi:v", t.TempDir()+"/rc", opts); !errors.Is(err, artifacts.ErrNoPlatform) {
		t.Errorf("missing platform: %v", err)
	}
}

func TestPullPrivateCA(t *testing.T) {
	reg := testbed.StartRegistry(t, "", "")
	testbed.PushArtifact(t, testbed.Repository(t, reg.Host, "kata", "", ""), "v", testbed.KataArtifact(12, 4096))
	// A TLS front whose certificate only the CA file vouches for.
	upstream, _ := url.Parse("http://" + reg.Host)
	tlsSrv := httptest.NewUnstartedServer(nil)
	tlsSrv.Config.Handler = newReverseProxy(upstream)
	tlsSrv.StartTLS()
	t.Cleanup(tlsSrv.Close)
	host := strings.TrimPrefix(tlsSrv.URL, "https://")
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: tlsSrv.Certificate().Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	_ = tls.VersionTLS12
	if _, err := artifacts.Pull(context.Background(), host+"/kata:v", t.TempDir()+"/rc", artifacts.Options{Retries: -1}); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("untrusted certificate: %v", err)
	}
	if _, err := artifacts.Pull(context.Background(), host+"/kata:v", t.TempDir()+"/rc", artifacts.Options{CAFile: ca}); err != nil {
		t.Errorf("with the CA file: %v", err)
	}
}

// A full disk and a read-only file system fail the pull with the cause, and
// the previous artifact stays.
func TestPullDiskFullAndReadOnly(t *testing.T) {
	if !inPrivateMounts(t) {
		return
	}
	reg := testbed.StartRegistry(t, "", "")
	repo := testbed.Repository(t, reg.Host, "kata", "", "")
	small := testbed.KataArtifact(30, 64<<10)
	testbed.PushArtifact(t, repo, "v", small)
	for _, tc := range []struct {
		name, options string
		remountRO     bool
		want          string
	}{
		{"disk full", "size=1m", false, "no space left on device"},
		{"read-only", "size=8m", true, "read-only file system"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testbed.PushArtifact(t, repo, "v", small)
			root := t.TempDir()
			mountTmpfs(t, root, tc.options)
			defer syscall.Unmount(root, syscall.MNT_DETACH)
			dir := filepath.Join(root, "rc")
			if _, err := artifacts.Pull(context.Background(), reg.Host+"/kata:v", dir, plain()); err != nil {
				t.Fatal(err)
			}
			testbed.PushArtifact(t, repo, "v", testbed.KataArtifact(31, 1<<20)) // 2 MiB more: too much for 1 MiB
			if tc.remountRO {
				if err := syscall.Mount("", root, "", syscall.MS_REMOUNT|syscall.MS_RDONLY, ""); err != nil {
					t.Fatal(err)
				}
			}
			_, err := artifacts.Pull(context.Background(), reg.Host+"/kata:v", dir, plain())
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), reg.Host+"/kata:v") {
				t.Fatalf("error %v; want one naming the reference and %q", err, tc.want)
			}
			checkFiles(t, dir, small)
			if !tc.remountRO {
				noDebris(t, dir)
			}
		})
	}
}
