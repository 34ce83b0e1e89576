package katamanager

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"regexp"

	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"

	"github.com/gpu-sandbox/gpu-sandbox/internal/cli"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/artifacts"
)

// Defaults, as NVIDIA's kata-manager has them.
const (
	// DefaultConfigFile is where the configuration is read.
	DefaultConfigFile = "/etc/kubernetes/kata-manager/config.yaml"
	// DefaultArtifactsDir holds the artifacts when the file names none.
	DefaultArtifactsDir = "/opt/nvidia-gpu-operator/artifacts/runtimeclasses"
)

// FileConfig is the configuration file as the GPU Operator writes it, with
// optional additions under artifacts (plainHTTP, caFile, platform).
type FileConfig struct {
	ArtifactsDir   string         `json:"artifactsDir"`
	RuntimeClasses []RuntimeClass `json:"runtimeClasses"`
}

// RuntimeClass is one runtime class to set up.
type RuntimeClass struct {
	Name string `json:"name"`
	// NodeSelector belongs to the RuntimeClass object in the cluster; the
	// node agent accepts it and does not use it.
	NodeSelector map[string]string `json:"nodeSelector,omitempty"`
	Artifacts    Artifacts         `json:"artifacts"`
}

// Artifacts says where a runtime class's guest artifacts come from.
type Artifacts struct {
	URL        string `json:"url"`
	PullSecret string `json:"pullSecret,omitempty"`
	PlainHTTP  bool   `json:"plainHTTP,omitempty"`
	CAFile     string `json:"caFile,omitempty"`
	Platform   string `json:"platform,omitempty"`
}

// dnsLabel is what a RuntimeClass handler must be.
var dnsLabel = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$`)

// LoadConfig reads and checks the configuration file. Every problem is a
// cli.UsageError that names the field.
func LoadConfig(path string) (*FileConfig, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("config file: %w", err)
	}
	if err != nil {
		return nil, cli.Usagef("config file: %v", err)
	}
	return ParseConfig(b, path)
}

// ParseConfig parses and checks configuration bytes read from source.
func ParseConfig(b []byte, source string) (*FileConfig, error) {
	var c FileConfig
	j, err := yaml.YAMLToJSONStrict(b)
	if err != nil {
		return nil, cli.Usagef("config file %q: %v", source, err)
	}
	// Case-sensitive and strict, as the API server reads objects: a field
	// spelled "plainHttp" is an unknown field, not plainHTTP.
	strict, err := kjson.UnmarshalStrict(j, &c, kjson.DisallowDuplicateFields, kjson.DisallowUnknownFields)
	if err == nil && len(strict) > 0 {
		err = errors.Join(strict...)
	}
	if err != nil {
		return nil, cli.Usagef("config file %q: %v", source, err)
	}
	var errs []error
	seen := map[string]bool{}
	for i, rc := range c.RuntimeClasses {
		field := fmt.Sprintf("runtimeClasses[%d]", i)
		switch {
		case rc.Name == "":
			errs = append(errs, fmt.Errorf("%s.name: empty", field))
		case !dnsLabel.MatchString(rc.Name):
			errs = append(errs, fmt.Errorf("%s.name %q: not a valid runtime class handler (lower-case letters, digits and '-', at most 63)", field, rc.Name))
		case seen[rc.Name]:
			errs = append(errs, fmt.Errorf("%s.name %q: listed twice", field, rc.Name))
		}
		seen[rc.Name] = true
		if rc.Artifacts.URL == "" {
			errs = append(errs, fmt.Errorf("%s.artifacts.url: empty", field))
		} else if _, err := artifacts.ParseReference(rc.Artifacts.URL); err != nil {
			errs = append(errs, fmt.Errorf("%s.artifacts.url: %w", field, err))
		}
		if rc.Artifacts.PullSecret != "" && !dnsSubdomain.MatchString(rc.Artifacts.PullSecret) {
			errs = append(errs, fmt.Errorf("%s.artifacts.pullSecret %q: not a valid Secret name", field, rc.Artifacts.PullSecret))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, cli.Usagef("config file %q: %v", source, err)
	}
	return &c, nil
}

var dnsSubdomain = regexp.MustCompile(`^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$`)
