package testbed

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"time"
)

// DockerRegistry is Debian's docker-registry (distribution 2.8), a real
// registry process on loopback, with its access log kept for counting.
type DockerRegistry struct {
	Host string
	log  Output
}

// StartDockerRegistry runs docker-registry with file-system storage under
// a temporary directory until the test ends.
func StartDockerRegistry(t T) *DockerRegistry {
	t.Helper()
	dir := t.TempDir()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	host := l.Addr().String()
	l.Close()
	cfg := filepath.Join(dir, "config.yml")
	err = os.WriteFile(cfg, []byte(fmt.Sprintf(`version: 0.1
log:
  level: error
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, filepath.Join(dir, "data"), host)), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	r := &DockerRegistry{Host: host}
	cmd := exec.Command(Program(t, "docker-registry"), "serve", cfg)
	cmd.Stdout, cmd.Stderr = &r.log, &r.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get("http://" + host + "/v2/")
		if err == nil {
			resp.Body.Close()
			return r
		}
		if time.Now().After(deadline) {
			t.Fatalf("docker-registry on %s did not answer: %v\n%s", host, err, r.log.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

var blobGet = regexp.MustCompile(`"GET /v2/[^" ]*/blobs/sha256:`)

// BlobGets counts the blob downloads in the access log so far.
func (r *DockerRegistry) BlobGets() int {
	return len(blobGet.FindAllString(r.log.String(), -1))
}
