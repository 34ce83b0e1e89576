package katamanager

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/gpu-sandbox/gpu-sandbox/internal/kubeapi"
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

// apiSecrets reads Secrets from the Kubernetes API of the cluster the agent
// runs in, in the agent's namespace, with its service account.
type apiSecrets struct {
	api       *kubeapi.Client
	namespace string
}

func newAPISecrets() (*apiSecrets, error) {
	api, err := kubeapi.InCluster(kubeapi.ServiceAccountDir)
	if err != nil {
		if errors.Is(err, kubeapi.ErrNotInCluster) {
			return nil, fmt.Errorf("%w; mount the pull secrets and use --pull-secrets-dir", err)
		}
		return nil, err
	}
	return withNamespace(api, os.Getenv("POD_NAMESPACE"))
}

// newAPISecretsIn reads the service account mounted at dir for the API
// server at server; namespace, when set, replaces the service account's.
func newAPISecretsIn(dir, server, namespace string) (*apiSecrets, error) {
	api, err := kubeapi.New(server, dir)
	if err != nil {
		return nil, err
	}
	return withNamespace(api, namespace)
}

func withNamespace(api *kubeapi.Client, namespace string) (*apiSecrets, error) {
	if namespace == "" {
		namespace = api.Namespace
	}
	if namespace == "" {
		return nil, errors.New("service account namespace: unknown (no namespace file, no POD_NAMESPACE)")
	}
	return &apiSecrets{api: api, namespace: namespace}, nil
}

func (a *apiSecrets) dockerConfig(ctx context.Context, name string) ([]byte, error) {
	var secret struct {
		Type string            `json:"type"`
		Data map[string][]byte `json:"data"` // base64 in JSON, decoded by encoding/json
	}
	if err := a.api.Get(ctx, fmt.Sprintf("/api/v1/namespaces/%s/secrets/%s", a.namespace, name), &secret); err != nil {
		return nil, fmt.Errorf("pull secret %s/%s: %w", a.namespace, name, err)
	}
	b, ok := secret.Data[".dockerconfigjson"]
	if !ok {
		return nil, fmt.Errorf("pull secret %s/%s is of type %q without .dockerconfigjson", a.namespace, name, secret.Type)
	}
	return b, nil
}
