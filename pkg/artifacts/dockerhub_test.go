package artifacts_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/artifacts"
)

// dockerHubTransport serves reg the way Docker Hub serves its registry: at
// the host registry-1.docker.io only, to bearer tokens that a token service
// hands out for the account's user name and password. It returns a
// transport that sends every connection to that server, as if DNS pointed
// Docker Hub's names at it, so a pull runs its real path: the reference's
// host, the credential lookup by that host, the token exchange.
func dockerHubTransport(t *testing.T, reg *testRegistry, user, password string) http.RoundTripper {
	t.Helper()
	const token = "hub-token"
	unauthorized := func(w http.ResponseWriter, challenge string) {
		if challenge != "" {
			w.Header().Set("WWW-Authenticate", challenge)
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Host != "registry-1.docker.io" {
			http.Error(w, "no registry at "+r.Host, http.StatusMisdirectedRequest)
			return
		}
		if r.URL.Path == "/token" {
			if u, p, ok := r.BasicAuth(); !ok || u != user || p != password {
				unauthorized(w, "")
				return
			}
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(map[string]string{"token": token, "access_token": token})
			return
		}
		if r.Header.Get("Authorization") != "Bearer "+token {
			// Docker Hub's realm is auth.docker.io; one on the registry's
			// own host spares the test the DNS lookup oras-go makes to
			// vet a realm on another host.
			unauthorized(w, `Bearer realm="http://registry-1.docker.io/token",service="registry.docker.io"`)
			return
		}
		reg.handler.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	addr := srv.Listener.Addr().String()
	var d net.Dialer
	return &http.Transport{DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return d.DialContext(ctx, network, addr)
	}}
}

// A Docker Hub pull secret works whichever of Docker Hub's names the
// reference and the secret use, as with the docker CLI. Guards against
// oras-go's lookup, which never finds the key docker login and kubectl
// write ("https://index.docker.io/v1/") for registry-1.docker.io, so that
// private Docker Hub artifacts were pulled anonymously and refused.
func TestPullDockerHubCredentials(t *testing.T) {
	const user, password = "acme", "s3cret"
	reg := startRegistry(t)
	files := kataFiles(1)
	push(t, reg.host, "acme/kata", "v1", files)
	push(t, reg.host, "library/kata", "v1", files)
	transport := dockerHubTransport(t, reg, user, password)

	const cliKey = "https://index.docker.io/v1/"
	for _, tc := range []struct {
		name     string
		key      string // the secret's only "auths" entry
		password string
		ref      string
		wantRef  string
		wantErr  error
	}{
		{name: "docker.io, docker login's key", key: cliKey, ref: "docker.io/acme/kata:v1", wantRef: "docker.io/acme/kata:v1"},
		{name: "registry-1.docker.io, docker login's key", key: cliKey, ref: "registry-1.docker.io/acme/kata:v1", wantRef: "registry-1.docker.io/acme/kata:v1"},
		{name: "index.docker.io, docker login's key", key: cliKey, ref: "index.docker.io/acme/kata:v1", wantRef: "docker.io/acme/kata:v1"},
		{name: "official repository", key: cliKey, ref: "docker.io/kata:v1", wantRef: "docker.io/library/kata:v1"},
		{name: "key docker.io", key: "docker.io", ref: "docker.io/acme/kata:v1", wantRef: "docker.io/acme/kata:v1"},
		{name: "key index.docker.io", key: "index.docker.io", ref: "docker.io/acme/kata:v1", wantRef: "docker.io/acme/kata:v1"},
		{name: "key registry-1.docker.io", key: "registry-1.docker.io", ref: "index.docker.io/acme/kata:v1", wantRef: "docker.io/acme/kata:v1"},
		{name: "key https://registry-1.docker.io/v2/", key: "https://registry-1.docker.io/v2/", ref: "docker.io/acme/kata:v1", wantRef: "docker.io/acme/kata:v1"},
		{name: "another registry's key", key: "nvcr.io", ref: "docker.io/acme/kata:v1", wantErr: artifacts.ErrUnauthorized},
		{name: "wrong password", key: cliKey, password: "wrong", ref: "docker.io/acme/kata:v1", wantErr: artifacts.ErrUnauthorized},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pw := password
			if tc.password != "" {
				pw = tc.password
			}
			secret, err := json.Marshal(map[string]any{"auths": map[string]any{
				tc.key: map[string]string{"auth": base64.StdEncoding.EncodeToString([]byte(user + ":" + pw))},
			}})
			if err != nil {
				t.Fatal(err)
			}
			dir := filepath.Join(t.TempDir(), "kata")
			res, err := artifacts.Pull(context.Background(), tc.ref, dir, artifacts.Options{
				DockerConfig: secret, PlainHTTP: true, Transport: transport, Retries: -1})
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("got %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if res.Reference != tc.wantRef {
				t.Errorf("pulled %s, want %s", res.Reference, tc.wantRef)
			}
			checkDir(t, dir, files, res)
		})
	}
}
