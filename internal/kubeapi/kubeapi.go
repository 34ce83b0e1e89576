// Package kubeapi is the agents' client of the Kubernetes API server: the
// few requests they make (read a Secret, read and watch their Node, label
// it, post an Event), as JSON over HTTPS with the pod's service account.
//
// It is not client-go on purpose: the agents need five calls, and a program
// making just the Node and Event calls with client-go is 26.6 MB, where all
// of vfio-manager is 9.4 MB (docs/decisions.md, "Mixed nodes").
package kubeapi

import (
	"bufio"
	"bytes"
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
	"strings"
	"time"
)

// ServiceAccountDir is where the kubelet mounts a pod's service account.
const ServiceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// ErrNotInCluster means the process does not run in a Kubernetes pod.
var ErrNotInCluster = errors.New("not running in a Kubernetes pod (no KUBERNETES_SERVICE_HOST)")

// Client talks to one API server with a service account.
type Client struct {
	http   *http.Client
	watch  *http.Client // without a timeout: a watch lasts
	server string
	// Namespace is the service account's namespace.
	Namespace string
	// tokenFile is read for every request: the kubelet rotates projected
	// service account tokens (about hourly where they are not extended), and
	// a token kept from the start is refused with 401 once it expires.
	tokenFile string
}

// InCluster is a Client for the API server of the cluster the pod runs in
// (KUBERNETES_SERVICE_HOST and _PORT), with the service account mounted at
// dir (ServiceAccountDir in a pod).
func InCluster(dir string) (*Client, error) {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return nil, ErrNotInCluster
	}
	return New("https://"+net.JoinHostPort(host, port), dir)
}

// New is a Client for the API server at server (https://host:port) with the
// service account files (token, namespace, ca.crt) in dir. A missing token or
// CA is an error now rather than at the first request.
func New(server, dir string) (*Client, error) {
	c := &Client{server: strings.TrimSuffix(server, "/"), tokenFile: filepath.Join(dir, "token")}
	if _, err := c.token(); err != nil {
		return nil, err
	}
	if b, err := os.ReadFile(filepath.Join(dir, "namespace")); err == nil {
		c.Namespace = strings.TrimSpace(string(b))
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
	transport := &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout: 10 * time.Second,
		IdleConnTimeout:     90 * time.Second,
	}
	c.http = &http.Client{Timeout: 30 * time.Second, Transport: transport}
	c.watch = &http.Client{Transport: transport}
	return c, nil
}

// token reads the service account token as it is now.
func (c *Client) token() (string, error) {
	b, err := os.ReadFile(c.tokenFile)
	if err != nil {
		return "", fmt.Errorf("service account token: %w", err)
	}
	t := strings.TrimSpace(string(b))
	if t == "" {
		return "", fmt.Errorf("service account token %q is empty", c.tokenFile)
	}
	return t, nil
}

// StatusError is an answer of the API server other than 2xx.
type StatusError struct {
	Code int
	// Message is the server's Status message, or the HTTP status.
	Message string
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("the API server answered %d: %s", e.Code, e.Message)
}

// IsNotFound reports whether err is a 404 from the API server.
func IsNotFound(err error) bool {
	var se *StatusError
	return errors.As(err, &se) && se.Code == http.StatusNotFound
}

// do sends a request with the token of the moment and returns the response
// of a 2xx answer; other answers become a StatusError.
func (c *Client) do(ctx context.Context, hc *http.Client, method, path, contentType string, body any) (*http.Response, error) {
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.server+path, r)
	if err != nil {
		return nil, err
	}
	token, err := c.token()
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		var status struct {
			Message string `json:"message"`
		}
		_ = json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&status)
		if status.Message == "" {
			status.Message = resp.Status
		}
		return nil, &StatusError{Code: resp.StatusCode, Message: status.Message}
	}
	return resp, nil
}

// Get reads the object at path into out.
func (c *Client) Get(ctx context.Context, path string, out any) error {
	resp, err := c.do(ctx, c.http, http.MethodGet, path, "", nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(io.LimitReader(resp.Body, 16<<20)).Decode(out); err != nil {
		return fmt.Errorf("unreadable answer: %w", err)
	}
	return nil
}

// MergePatch applies a JSON merge patch (RFC 7386) to the object at path.
func (c *Client) MergePatch(ctx context.Context, path string, patch any) error {
	resp, err := c.do(ctx, c.http, http.MethodPatch, path, "application/merge-patch+json", patch)
	if err != nil {
		return err
	}
	return resp.Body.Close()
}

// Create posts a new object to the collection at path.
func (c *Client) Create(ctx context.Context, path string, obj any) error {
	resp, err := c.do(ctx, c.http, http.MethodPost, path, "application/json", obj)
	if err != nil {
		return err
	}
	return resp.Body.Close()
}

// WatchEvent is one event of a watch: ADDED, MODIFIED, DELETED, BOOKMARK or
// ERROR, with the object as the server sent it.
type WatchEvent struct {
	Type   string          `json:"type"`
	Object json.RawMessage `json:"object"`
}

// Watch streams the events of the watch at path (with watch=true among its
// query parameters) to fn until the server ends the stream (nil), the
// context ends, or fn returns an error.
func (c *Client) Watch(ctx context.Context, path string, fn func(WatchEvent) error) error {
	resp, err := c.do(ctx, c.watch, http.MethodGet, path, "", nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(bufio.NewReader(resp.Body))
	for {
		var ev WatchEvent
		if err := dec.Decode(&ev); err != nil {
			if errors.Is(err, io.EOF) || ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("watch: %w", err)
		}
		if err := fn(ev); err != nil {
			return err
		}
	}
}
