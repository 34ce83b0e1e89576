package katamanager

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// secrets finds a pull secret's .dockerconfigjson by the Secret's name.
type secrets interface {
	dockerConfig(ctx context.Context, name string) ([]byte, error)
}

// dirSecrets reads Secrets mounted as <dir>/<name>/.dockerconfigjson.
type dirSecrets struct{ dir string }

func (d dirSecrets) dockerConfig(_ context.Context, name string) ([]byte, error) {
	b, err := os.ReadFile(filepath.Join(d.dir, name, ".dockerconfigjson"))
	if err != nil {
		return nil, fmt.Errorf("pull secret %q: %w", name, err)
	}
	return b, nil
}

// Where a pod finds its service account, as the kubelet mounts it.
const serviceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// apiSecrets reads Secrets from the Kubernetes API of the cluster the agent
// runs in, in the agent's namespace, with its service account.
type apiSecrets struct {
	client    *http.Client
	server    string
	namespace string
	token     string
}

func newAPISecrets() (*apiSecrets, error) {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return nil, fmt.Errorf("not running in a Kubernetes pod (no KUBERNETES_SERVICE_HOST); mount the pull secrets and use --pull-secrets-dir")
	}
	token, err := os.ReadFile(filepath.Join(serviceAccountDir, "token"))
	if err != nil {
		return nil, fmt.Errorf("service account token: %w", err)
	}
	ns := os.Getenv("POD_NAMESPACE")
	if ns == "" {
		b, err := os.ReadFile(filepath.Join(serviceAccountDir, "namespace"))
		if err != nil {
			return nil, fmt.Errorf("service account namespace: %w", err)
		}
		ns = strings.TrimSpace(string(b))
	}
	ca, err := os.ReadFile(filepath.Join(serviceAccountDir, "ca.crt"))
	if err != nil {
		return nil, fmt.Errorf("service account CA: %w", err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	return &apiSecrets{
		client: &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}},
		server:    "https://" + net.JoinHostPort(host, port),
		namespace: ns,
		token:     strings.TrimSpace(string(token)),
	}, nil
}

func (a *apiSecrets) dockerConfig(ctx context.Context, name string) ([]byte, error) {
	url := fmt.Sprintf("%s/api/v1/namespaces/%s/secrets/%s", a.server, a.namespace, name)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+a.token)
	req.Header.Set("Accept", "application/json")
	resp, err := a.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("pull secret %s/%s: %w", a.namespace, name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("pull secret %s/%s: the API server answered %s", a.namespace, name, resp.Status)
	}
	var secret struct {
		Type string            `json:"type"`
		Data map[string][]byte `json:"data"` // base64 in JSON, decoded by encoding/json
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&secret); err != nil {
		return nil, fmt.Errorf("pull secret %s/%s: unreadable answer", a.namespace, name)
	}
	b, ok := secret.Data[".dockerconfigjson"]
	if !ok {
		return nil, fmt.Errorf("pull secret %s/%s is of type %q without .dockerconfigjson", a.namespace, name, secret.Type)
	}
	return b, nil
}
