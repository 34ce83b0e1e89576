//go:build cluster

package e2e

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// kubeBinary is the one binary of every Kubernetes component that
// hack/fetch-kubernetes.sh builds.
func kubeBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(repoRoot(), ".cache", "kubernetes", "kube")
	if _, err := os.Stat(bin); err != nil {
		t.Fatal("Kubernetes is missing: run hack/fetch-kubernetes.sh (make e2e-cluster does)")
	}
	return bin
}

// cluster is a single-node Kubernetes: etcd, the API server, the
// controller manager, the scheduler and a kubelet, each a process of the
// kube binary with its log in the work dir.
type cluster struct {
	t     *testing.T
	kube  string
	dir   string // work dir of the components: pki, configs, etcd data, logs
	procs []*exec.Cmd
	logs  []string
	start time.Time
}

// step logs how long the run took to get somewhere: the timings in
// docs/testing.md come from here.
func (c *cluster) step(what string) {
	c.t.Logf("%6.1fs %s", time.Since(c.start).Seconds(), what)
}

// run starts a component in the background until the test ends.
func (c *cluster) run(name string, args ...string) {
	c.t.Helper()
	log := filepath.Join(c.dir, "logs", name+".log")
	os.MkdirAll(filepath.Dir(log), 0o755)
	f, err := os.Create(log)
	if err != nil {
		c.t.Fatal(err)
	}
	cmd := exec.Command(c.kube, append([]string{name}, args...)...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = append(os.Environ(), "PATH=/usr/sbin:/usr/bin:/sbin:/bin")
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	f.Close()
	c.procs = append(c.procs, cmd)
	c.logs = append(c.logs, log)
	c.t.Cleanup(func() { stopProcess(cmd) })
}

// stopProcess ends a process with SIGTERM, then SIGKILL after 10 s.
func stopProcess(cmd *exec.Cmd) {
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
	}
}

// tails returns the last lines of every component's log.
func (c *cluster) tails(n int) string {
	var b strings.Builder
	for _, l := range c.logs {
		data, _ := os.ReadFile(l)
		lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
		if len(lines) > n {
			lines = lines[len(lines)-n:]
		}
		fmt.Fprintf(&b, "--- %s (last %d lines)\n%s\n", filepath.Base(l), len(lines), strings.Join(lines, "\n"))
	}
	return b.String()
}

// pki writes a CA and every certificate the components use: the API
// server's serving certificate (for 127.0.0.1, the node and the Service
// IP), client certificates for the administrator, the controller manager,
// the scheduler, the kubelet (system:node:<node>) and the API server's
// calls to the kubelet, and the service account signing key.
func (c *cluster) pki() {
	c.t.Helper()
	dir := filepath.Join(c.dir, "pki")
	os.MkdirAll(dir, 0o700)
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "gpu-sandbox-e2e-ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour), IsCA: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature, BasicConstraintsValid: true}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		c.t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	writePEM(c.t, filepath.Join(dir, "ca.crt"), "CERTIFICATE", caDER)
	serial := int64(2)
	issue := func(name, cn string, orgs []string, server bool) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn, Organization: orgs},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
		serial++
		if server {
			tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
			tmpl.DNSNames = []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
				"kubernetes.default.svc.cluster.local"}
			tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP(nodeIP), net.ParseIP(serviceIP)}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			c.t.Fatal(err)
		}
		writePEM(c.t, filepath.Join(dir, name+".crt"), "CERTIFICATE", der)
		kb, _ := x509.MarshalECPrivateKey(key)
		writePEM(c.t, filepath.Join(dir, name+".key"), "EC PRIVATE KEY", kb)
	}
	issue("apiserver", "kube-apiserver", nil, true)
	issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", []string{"system:masters"}, false)
	issue("admin", "kubernetes-admin", []string{"system:masters"}, false)
	issue("controller-manager", "system:kube-controller-manager", nil, false)
	issue("scheduler", "system:kube-scheduler", nil, false)
	issue("kubelet", "system:node:"+nodeName, []string{"system:nodes"}, false)
	saKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	kb, _ := x509.MarshalECPrivateKey(saKey)
	writePEM(c.t, filepath.Join(dir, "sa.key"), "EC PRIVATE KEY", kb)
	pub, _ := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	writePEM(c.t, filepath.Join(dir, "sa.pub"), "PUBLIC KEY", pub)
	for _, user := range []string{"admin", "controller-manager", "scheduler", "kubelet"} {
		kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: https://127.0.0.1:443
    certificate-authority: %[1]s/ca.crt
users:
- name: %[2]s
  user:
    client-certificate: %[1]s/%[2]s.crt
    client-key: %[1]s/%[2]s.key
contexts:
- name: e2e
  context:
    cluster: e2e
    user: %[2]s
current-context: e2e
`, dir, user)
		if err := os.WriteFile(filepath.Join(dir, user+".kubeconfig"), []byte(kc), 0o600); err != nil {
			c.t.Fatal(err)
		}
	}
}

func writePEM(t *testing.T, path, kind string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

func (c *cluster) pkiPath(name string) string { return filepath.Join(c.dir, "pki", name) }

// startControlPlane starts etcd and the API server, waits until the API
// server is ready, then starts the controller manager and the scheduler.
func (c *cluster) startControlPlane() {
	c.t.Helper()
	c.run("etcd", "--name", "e2e", "--data-dir", filepath.Join(c.dir, "etcd"),
		"--listen-client-urls", "http://127.0.0.1:2379", "--advertise-client-urls", "http://127.0.0.1:2379",
		"--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
		"--initial-cluster", "e2e=http://127.0.0.1:2380", "--unsafe-no-fsync", "--log-level", "warn")
	c.run("kube-apiserver", "--etcd-servers", "http://127.0.0.1:2379",
		"--bind-address", "0.0.0.0", "--secure-port", "443", "--advertise-address", nodeIP,
		"--service-cluster-ip-range", serviceRange, "--allow-privileged",
		"--tls-cert-file", c.pkiPath("apiserver.crt"), "--tls-private-key-file", c.pkiPath("apiserver.key"),
		"--client-ca-file", c.pkiPath("ca.crt"),
		"--kubelet-client-certificate", c.pkiPath("apiserver-kubelet-client.crt"),
		"--kubelet-client-key", c.pkiPath("apiserver-kubelet-client.key"), "--kubelet-preferred-address-types", "InternalIP",
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file", c.pkiPath("sa.pub"), "--service-account-signing-key-file", c.pkiPath("sa.key"),
		"--authorization-mode", "Node,RBAC", "--enable-admission-plugins", "NodeRestriction",
		"--cert-dir", filepath.Join(c.dir, "apiserver"), "--profiling=false")
	cert, err := tls.LoadX509KeyPair(c.pkiPath("admin.crt"), c.pkiPath("admin.key"))
	if err != nil {
		c.t.Fatal(err)
	}
	pool := x509.NewCertPool()
	caPEM, _ := os.ReadFile(c.pkiPath("ca.crt"))
	pool.AppendCertsFromPEM(caPEM)
	client := &http.Client{Timeout: 2 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool}}}
	c.waitFor("the API server ready", time.Minute, func() (bool, string) {
		resp, err := client.Get("https://127.0.0.1:443/readyz")
		if err != nil {
			return false, err.Error()
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, resp.Status
	})
	c.step("API server ready")
	c.run("kube-controller-manager", "--kubeconfig", c.pkiPath("controller-manager.kubeconfig"),
		"--authentication-kubeconfig", c.pkiPath("controller-manager.kubeconfig"),
		"--authorization-kubeconfig", c.pkiPath("controller-manager.kubeconfig"),
		"--leader-elect=false", "--service-account-private-key-file", c.pkiPath("sa.key"),
		"--root-ca-file", c.pkiPath("ca.crt"), "--use-service-account-credentials",
		"--bind-address", "127.0.0.1", "--profiling=false")
	c.run("kube-scheduler", "--kubeconfig", c.pkiPath("scheduler.kubeconfig"),
		"--authentication-kubeconfig", c.pkiPath("scheduler.kubeconfig"),
		"--authorization-kubeconfig", c.pkiPath("scheduler.kubeconfig"),
		"--leader-elect=false", "--bind-address", "127.0.0.1", "--profiling=false")
}

// startKubelet starts the kubelet on the CRI socket, in the cgroup root the
// parent test made, and waits until its Node is Ready.
func (c *cluster) startKubelet(criSocket, cgroupRoot string) {
	c.t.Helper()
	cfg := filepath.Join(c.dir, "kubelet.yaml")
	err := os.WriteFile(cfg, []byte(fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: %s
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://%s
# A cgroup v1 machine without systemd as the cgroup manager, and with swap
# allowed: the kubelet refuses the first and the last by default.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /%s
failSwapOn: false
# No DNS service in this cluster, and the machine's resolv.conf may point
# into its /run, which the cluster does not see.
resolvConf: ""
# The machine's disk is shared with other work: no evictions, no image GC.
evictionHard:
  memory.available: 1Mi
  nodefs.available: 1%%
  nodefs.inodesFree: 1%%
  imagefs.available: 1%%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
`, c.pkiPath("ca.crt"), criSocket, cgroupRoot)), 0o644)
	if err != nil {
		c.t.Fatal(err)
	}
	c.run("kubelet", "--config", cfg, "--kubeconfig", c.pkiPath("kubelet.kubeconfig"),
		"--hostname-override", nodeName, "--node-ip", nodeIP)
	c.waitFor("the Node Ready", 2*time.Minute, func() (bool, string) {
		out, err := c.kubectlErr("get", "node", nodeName, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
		return err == nil && out == "True", out
	})
	c.step("Node Ready")
}

// kubectl runs the kube binary's kubectl as the administrator, from the
// repository root, and fails the test on an error.
func (c *cluster) kubectl(args ...string) string {
	c.t.Helper()
	out, err := c.kubectlErr(args...)
	if err != nil {
		c.t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func (c *cluster) kubectlErr(args ...string) (string, error) {
	return c.kubectlIn(nil, args...)
}

// kubectlIn is kubectl with stdin.
func (c *cluster) kubectlIn(stdin []byte, args ...string) (string, error) {
	cmd := exec.Command(c.kube, append([]string{"kubectl", "--kubeconfig", c.pkiPath("admin.kubeconfig")}, args...)...)
	cmd.Dir = repoRoot()
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	if err != nil {
		return strings.TrimSpace(out.String() + errOut.String()), err
	}
	return strings.TrimSpace(out.String()), nil
}

// get reads an object (or list) as JSON into v.
func (c *cluster) get(v any, args ...string) {
	c.t.Helper()
	out := c.kubectl(append(append([]string{"get"}, args...), "-o", "json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		c.t.Fatalf("kubectl get %v: %v", args, err)
	}
}

// waitFor polls cond every 100 ms until it holds, failing the test with
// cond's last word after timeout.
func (c *cluster) waitFor(what string, timeout time.Duration, cond func() (bool, string)) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, last := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s: not within %s; last: %s", what, timeout, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
