package vfiomanager

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gpu-sandbox/gpu-sandbox/internal/kubeapi"
)

// fakeAPI serves one Node the way the API server does: GET, a watch that
// streams the Node's changes and can be ended with 410 Gone, merge patches
// of its labels, and Events. It checks the bearer token on every request.
type fakeAPI struct {
	srv  *httptest.Server
	name string

	mu      sync.Mutex
	node    map[string]any // metadata: name, uid, resourceVersion, labels, annotations
	version int
	watches []chan string // event lines for the open watches
	events  []map[string]any
	patches int
	gets    int
}

func newFakeAPI(t *testing.T, name string) *fakeAPI {
	f := &fakeAPI{name: name, node: map[string]any{"name": name, "uid": "uid-" + name, "labels": map[string]any{}, "annotations": map[string]any{}}}
	f.srv = httptest.NewTLSServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeAPI) object() map[string]any {
	f.node["resourceVersion"] = fmt.Sprint(f.version)
	b, _ := json.Marshal(map[string]any{"kind": "Node", "apiVersion": "v1", "metadata": f.node})
	var out map[string]any
	json.Unmarshal(b, &out)
	return out
}

func (f *fakeAPI) serve(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer token-1" {
		http.Error(w, `{"kind":"Status","code":401,"message":"Unauthorized"}`, http.StatusUnauthorized)
		return
	}
	name := f.name
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/api/v1/nodes/"+name:
		f.mu.Lock()
		f.gets++
		obj := f.object()
		f.mu.Unlock()
		json.NewEncoder(w).Encode(obj)
	case r.Method == http.MethodGet && r.URL.Path == "/api/v1/nodes" && r.URL.Query().Get("watch") == "true":
		if r.URL.Query().Get("fieldSelector") != "metadata.name="+name {
			http.Error(w, "bad selector", http.StatusBadRequest)
			return
		}
		ch := make(chan string, 16)
		f.mu.Lock()
		f.watches = append(f.watches, ch)
		f.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		for {
			select {
			case <-r.Context().Done():
				return
			case line, ok := <-ch:
				if !ok {
					return
				}
				io.WriteString(w, line+"\n")
				w.(http.Flusher).Flush()
			}
		}
	case r.Method == http.MethodPatch && r.URL.Path == "/api/v1/nodes/"+name:
		if r.Header.Get("Content-Type") != "application/merge-patch+json" {
			http.Error(w, "unsupported patch", http.StatusUnsupportedMediaType)
			return
		}
		var patch struct {
			Metadata struct {
				Labels map[string]string `json:"labels"`
			} `json:"metadata"`
		}
		json.NewDecoder(r.Body).Decode(&patch)
		f.mu.Lock()
		f.patches++
		for k, v := range patch.Metadata.Labels {
			f.node["labels"].(map[string]any)[k] = v
		}
		f.bumpLocked()
		f.mu.Unlock()
		io.WriteString(w, "{}")
	case r.Method == http.MethodPost && r.URL.Path == "/api/v1/namespaces/default/events":
		var ev map[string]any
		json.NewDecoder(r.Body).Decode(&ev)
		f.mu.Lock()
		f.events = append(f.events, ev)
		f.mu.Unlock()
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, "{}")
	default:
		http.Error(w, `{"kind":"Status","code":404,"message":"not found"}`, http.StatusNotFound)
	}
}

// bumpLocked makes a new version of the Node and sends it to every watch.
func (f *fakeAPI) bumpLocked() {
	f.version++
	b, _ := json.Marshal(map[string]any{"type": "MODIFIED", "object": f.object()})
	for _, ch := range f.watches {
		ch <- string(b)
	}
}

// annotate sets (or with "" removes) an annotation, as kubectl annotate does.
func (f *fakeAPI) annotate(key, value string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ann := f.node["annotations"].(map[string]any)
	if value == "" {
		delete(ann, key)
	} else {
		ann[key] = value
	}
	f.bumpLocked()
}

// expire ends every open watch with 410 Gone, as the API server does when
// the watched version is compacted away.
func (f *fakeAPI) expire() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, ch := range f.watches {
		ch <- `{"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Expired","message":"too old resource version"}}`
		close(ch)
	}
	f.watches = nil
}

func (f *fakeAPI) client(t *testing.T) *kubeapi.Client {
	dir := t.TempDir()
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: f.srv.Certificate().Raw})
	for name, content := range map[string]string{"token": "token-1\n", "ca.crt": string(ca), "namespace": "gpu-sandbox"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	c, err := kubeapi.New(f.srv.URL, dir)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// waitPolicy polls the source until the Node's policy reads want.
func waitPolicy(t *testing.T, n *nodeSource, changed chan struct{}, want string) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		if d, ok := n.declared(); ok && d.err == nil && d.value == want {
			return
		}
		select {
		case <-changed:
		case <-deadline:
			d, _ := n.declared()
			t.Fatalf("policy %q (%v), want %q", d.value, d.err, want)
		}
	}
}

// The Node is read, then watched: an annotation an administrator sets is
// seen without a new read, a watch the server expires is started again
// from a fresh read, and until the first read nothing is decided.
func TestNodeSourceWatchesTheNode(t *testing.T) {
	api := newFakeAPI(t, "gpu-node-1")
	n := &nodeSource{api: api.client(t), name: "gpu-node-1"}
	if d, ok := n.declared(); !ok || d.err == nil || !strings.Contains(d.err.Error(), "nothing changes") {
		t.Fatalf("before the first read: %+v, %v", d, ok)
	}
	ctx, cancel := context.WithCancel(context.Background())
	changed := make(chan struct{}, 1)
	done := make(chan struct{})
	go func() { defer close(done); n.run(ctx, changed) }()
	defer func() { cancel(); <-done }()

	// Read, and the Node says nothing: the lower sources decide.
	deadline := time.Now().Add(10 * time.Second)
	for n.uid() == "" {
		if time.Now().After(deadline) {
			t.Fatal("the node was never read")
		}
		<-changed
	}
	if _, ok := n.declared(); ok {
		t.Error("a Node without the policy decided one")
	}
	waitWatches(t, api, 1)
	api.annotate(PolicyKey, "numa1")
	waitPolicy(t, n, changed, "numa1")

	api.expire()
	waitWatches(t, api, 1)
	api.annotate(PolicyKey, "0000:18:00.0,0000:2a:00.0")
	waitPolicy(t, n, changed, "0000:18:00.0,0000:2a:00.0")
	api.mu.Lock()
	gets := api.gets
	api.mu.Unlock()
	if gets != 2 {
		t.Errorf("%d reads of the node, want 2: one at the start, one after the expired watch", gets)
	}
}

func waitWatches(t *testing.T, api *fakeAPI, want int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		api.mu.Lock()
		n := len(api.watches)
		api.mu.Unlock()
		if n == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d watches open, want %d", n, want)
		}
		time.Sleep(time.Millisecond)
	}
}

// Which of the Node's keys decides, and what the operator's label means.
func TestFromNode(t *testing.T) {
	for _, tc := range []struct {
		labels, annotations map[string]string
		want                string // value, or "error"
		none                bool
	}{
		{labels: map[string]string{PolicyKey: "4"}, annotations: map[string]string{PolicyKey: "gpu0,gpu1"}, want: "gpu0,gpu1"},
		{labels: map[string]string{PolicyKey: "4", WorkloadConfigLabel: "container"}, want: "4"},
		{labels: map[string]string{WorkloadConfigLabel: "vm-passthrough"}, want: "all"},
		{labels: map[string]string{WorkloadConfigLabel: "container"}, want: "none"},
		{labels: map[string]string{WorkloadConfigLabel: "vm-vgpu"}, want: "none"},
		{labels: map[string]string{WorkloadConfigLabel: "vm-passthru"}, want: "error"},
		{labels: map[string]string{PolicyKey: "lots"}, want: "error"},
		{labels: map[string]string{"nvidia.com/gpu.present": "true"}, none: true},
	} {
		d, ok := fromNode("n1", tc.labels, tc.annotations)
		switch {
		case tc.none:
			if ok {
				t.Errorf("%v: decided %+v", tc.labels, d)
			}
		case tc.want == "error":
			if !ok || d.err == nil || !strings.Contains(d.err.Error(), "on node n1") || !strings.Contains(d.err.Error(), "nothing changes") {
				t.Errorf("%v: %+v, want an error naming the node's key", tc.labels, d)
			}
		case !ok || d.err != nil || d.policy.String() != tc.want:
			t.Errorf("%v %v: %+v, want %s", tc.labels, tc.annotations, d, tc.want)
		}
	}
}

// Events name the Node; count labels are patched only when they change.
func TestNodeReporter(t *testing.T) {
	api := newFakeAPI(t, "gpu-node-1")
	n := &nodeSource{api: api.client(t), name: "gpu-node-1"}
	ctx := context.Background()
	if err := n.read(ctx); err != nil {
		t.Fatal(err)
	}
	r := &nodeReporter{api: n.api, node: n}
	if err := r.event(ctx, true, "VFIOHeld", "held by pid 1"); err != nil {
		t.Fatal(err)
	}
	ev := api.events[0]
	obj := ev["involvedObject"].(map[string]any)
	if obj["kind"] != "Node" || obj["name"] != "gpu-node-1" || obj["uid"] != "uid-gpu-node-1" || ev["type"] != "Warning" || ev["reason"] != "VFIOHeld" {
		t.Errorf("event %v", ev)
	}
	if err := r.counts(ctx, 4, 4); err != nil {
		t.Fatal(err)
	}
	if err := n.read(ctx); err != nil {
		t.Fatal(err)
	}
	if err := r.counts(ctx, 4, 4); err != nil {
		t.Fatal(err)
	}
	if api.patches != 1 {
		t.Errorf("%d patches for one change", api.patches)
	}
	labels := n.labels()
	if labels[VMCountLabel] != "4" || labels[ContainerCountLabel] != "4" {
		t.Errorf("labels %v", labels)
	}
	// An API server that refuses says so, with the node's name.
	bad := &nodeSource{api: n.api, name: "other-node"}
	if err := bad.read(ctx); err == nil || !kubeapi.IsNotFound(err) || !strings.Contains(err.Error(), "other-node") {
		t.Errorf("read of a missing node: %v", err)
	}
}
