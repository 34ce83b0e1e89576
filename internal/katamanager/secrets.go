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
	// tokenFile is read for every request: the kubelet rotates projected
	// service account tokens (about hourly where they are not extended), and
	// a token kept from the start is refused with 401 once it expires.
	tokenFile string
}

func newAPISecrets() (*apiSecrets, error) {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return nil, fmt.Errorf("not running in a Kubernetes pod (no KUBERNETES_SERVICE_HOST); mount the pull secrets and use --pull-secrets-dir")
	}
	return newAPISecretsIn(serviceAccountDir, "https://"+net.JoinHostPort(host, port), os.Getenv("POD_NAMESPACE"))
}

// newAPISecretsIn reads the service account mounted at dir (token,
// namespace, ca.crt) for the API server at server; namespace, when set,
// replaces the service account's.
func newAPISecretsIn(dir, server, namespace string) (*apiSecrets, error) {
	a := &apiSecrets{server: server, namespace: namespace, tokenFile: filepath.Join(dir, "token")}
	// A missing token is a deployment error: say so at the start rather
	// than at the first pull.
	if _, err := a.token(); err != nil {
		return nil, err
	}
	if a.namespace == "" {
		b, err := os.ReadFile(filepath.Join(dir, "namespace"))
		if err != nil {
			return nil, fmt.Errorf("service account namespace: %w", err)
		}
		a.namespace = strings.TrimSpace(string(b))
	}
	caFile := filepath.Join(dir, "ca.crt")
	ca, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("service account CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("service account CA %q holds no PEM certificate", caFile)
	}
	a.client = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}
	return a, nil
}

// token reads the service account token as it is now.
func (a *apiSecrets) token() (string, error) {
	b, err := os.ReadFile(a.tokenFile)
	if err != nil {
		return "", fmt.Errorf("service account token: %w", err)
	}
	t := strings.TrimSpace(string(b))
	if t == "" {
		return "", fmt.Errorf("service account token %q is empty", a.tokenFile)
	}
	return t, nil
}

func (a *apiSecrets) dockerConfig(ctx context.Context, name string) ([]byte, error) {
	url := fmt.Sprintf("%s/api/v1/namespaces/%s/secrets/%s", a.server, a.namespace, name)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	token, err := a.token()
	if err != nil {
		return nil, fmt.Errorf("pull secret %s/%s: %w", a.namespace, name, err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
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
