package katamanager

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// fakeAPIServer answers GET .../namespaces/<ns>/secrets/<name> like the
// Kubernetes API server, accepting only the token it was last given: an
// expired projected token is refused with 401 there too.
type fakeAPIServer struct {
	srv    *httptest.Server
	mu     sync.Mutex
	token  string
	tokens []string // as presented, in order
}

func newFakeAPIServer(t *testing.T, namespace, secret string, dockerConfig []byte) *fakeAPIServer {
	f := &fakeAPIServer{}
	f.srv = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		presented, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		f.tokens = append(f.tokens, presented)
		ok := presented == f.token
		f.mu.Unlock()
		if !ok {
			http.Error(w, `{"kind":"Status","code":401,"reason":"Unauthorized"}`, http.StatusUnauthorized)
			return
		}
		if r.URL.Path != "/api/v1/namespaces/"+namespace+"/secrets/"+secret {
			http.NotFound(w, r)
			return
		}
		json.NewEncoder(w).Encode(map[string]any{
			"kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
			"data": map[string][]byte{".dockerconfigjson": dockerConfig},
		})
	}))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeAPIServer) accept(token string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.token = token
}

func (f *fakeAPIServer) presented() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.tokens...)
}

// serviceAccountTree writes what the kubelet mounts for a projected service
// account volume: the files are links into a ..data link to a timestamped
// directory, and an update swaps ..data in one rename.
type serviceAccountTree struct {
	t   *testing.T
	dir string
	gen int
}

func (s *serviceAccountTree) write(files map[string]string) {
	s.t.Helper()
	s.gen++
	ts := filepath.Join(s.dir, fmt.Sprintf("..2026_01_01_00_00_%02d", s.gen))
	if err := os.Mkdir(ts, 0o755); err != nil {
		s.t.Fatal(err)
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(ts, name), []byte(content), 0o644); err != nil {
			s.t.Fatal(err)
		}
		link := filepath.Join(s.dir, name)
		if _, err := os.Lstat(link); err != nil {
			if err := os.Symlink(filepath.Join("..data", name), link); err != nil {
				s.t.Fatal(err)
			}
		}
	}
	tmp := filepath.Join(s.dir, "..data_tmp")
	if err := os.Symlink(filepath.Base(ts), tmp); err != nil {
		s.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(s.dir, "..data")); err != nil {
		s.t.Fatal(err)
	}
}

// The token is rotated during a run, as the kubelet does for projected
// tokens, and the API server takes only the current one: every lookup
// must present the token of the moment. Guards against reading it once.
func TestAPISecretsTokenRotation(t *testing.T) {
	dockerConfig := []byte(`{"auths":{"nvcr.io":{"auth":"JG9hdXRodG9rZW46c2VjcmV0"}}}`)
	for _, tc := range []struct {
		name   string
		rotate func(s *serviceAccountTree, token string)
	}{
		{"kubelet swaps the ..data link", func(s *serviceAccountTree, token string) {
			s.write(map[string]string{"token": token})
		}},
		{"file rewritten in place", func(s *serviceAccountTree, token string) {
			if err := os.WriteFile(filepath.Join(s.dir, "token"), []byte(token+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			api := newFakeAPIServer(t, "gpu-operator", "ngc", dockerConfig)
			ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: api.srv.Certificate().Raw})
			sa := &serviceAccountTree{t: t, dir: t.TempDir()}
			sa.write(map[string]string{"token": "token-1", "namespace": "gpu-operator", "ca.crt": string(ca)})
			secrets, err := newAPISecretsIn(sa.dir, api.srv.URL, "")
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()

			for i, token := range []string{"token-1", "token-2", "token-3"} {
				if i > 0 {
					tc.rotate(sa, token)
				}
				api.accept(token)
				b, err := secrets.dockerConfig(ctx, "ngc")
				if err != nil {
					t.Fatalf("lookup with %s current: %v (presented: %q)", token, err, api.presented())
				}
				if string(b) != string(dockerConfig) {
					t.Fatalf("lookup with %s current: got %q", token, b)
				}
			}
			if got, want := strings.Join(api.presented(), " "), "token-1 token-2 token-3"; got != want {
				t.Errorf("tokens presented: %s, want %s", got, want)
			}
		})
	}
}

// A token that is gone or empty fails the lookup with an error naming the
// token, before anything is sent.
func TestAPISecretsTokenMissing(t *testing.T) {
	api := newFakeAPIServer(t, "ns", "s", []byte(`{}`))
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: api.srv.Certificate().Raw})
	sa := &serviceAccountTree{t: t, dir: t.TempDir()}
	sa.write(map[string]string{"token": "t", "ca.crt": string(ca)})
	secrets, err := newAPISecretsIn(sa.dir, api.srv.URL, "ns")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		content *string
	}{
		{"empty", new("  \n")},
		{"removed", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(sa.dir, "token")
			os.Remove(path)
			if tc.content != nil {
				if err := os.WriteFile(path, []byte(*tc.content), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			_, err := secrets.dockerConfig(context.Background(), "s")
			if err == nil || !strings.Contains(err.Error(), "service account token") {
				t.Fatalf("got %v, want an error naming the service account token", err)
			}
		})
	}
	if n := len(api.presented()); n != 0 {
		t.Errorf("%d requests sent without a token", n)
	}
}
