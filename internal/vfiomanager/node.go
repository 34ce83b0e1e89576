package vfiomanager

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/gpu-sandbox/gpu-sandbox/internal/kubeapi"
)

// nodeMeta is the part of a Node vfio-manager reads.
type nodeMeta struct {
	Metadata struct {
		Name            string            `json:"name"`
		UID             string            `json:"uid"`
		ResourceVersion string            `json:"resourceVersion"`
		Labels          map[string]string `json:"labels"`
		Annotations     map[string]string `json:"annotations"`
	} `json:"metadata"`
}

// nodeSource keeps the agent's Node as the API server last gave it, read
// once and then watched; a broken watch is started again from a fresh read.
type nodeSource struct {
	api  *kubeapi.Client
	name string

	mu   sync.Mutex
	node *nodeMeta // nil until read once
	err  error     // the last failure, nil once it works again
}

// declared is the Node's policy; ok is false when the Node says nothing,
// and then the lower sources decide. Until the Node has been read, the
// policy is an error: nothing changes on a guess.
func (n *nodeSource) declared() (declared, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.node == nil {
		err := n.err
		if err == nil {
			err = fmt.Errorf("not read yet")
		}
		return declared{source: "node " + n.name, err: fmt.Errorf("node %s: %w; nothing changes until it is read", n.name, err)}, true
	}
	return fromNode(n.name, n.node.Metadata.Labels, n.node.Metadata.Annotations)
}

func (n *nodeSource) uid() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.node == nil {
		return ""
	}
	return n.node.Metadata.UID
}

func (n *nodeSource) labels() map[string]string {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.node == nil {
		return nil
	}
	return maps.Clone(n.node.Metadata.Labels)
}

func (n *nodeSource) set(node *nodeMeta, err error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if node != nil {
		n.node = node
	}
	n.err = err
}

// read gets the Node once.
func (n *nodeSource) read(ctx context.Context) error {
	var node nodeMeta
	if err := n.api.Get(ctx, "/api/v1/nodes/"+url.PathEscape(n.name), &node); err != nil {
		err = fmt.Errorf("read node %s: %w", n.name, err)
		n.set(nil, err)
		return err
	}
	n.set(&node, nil)
	return nil
}

// watchTimeout is how long one watch lasts before the server ends it and the
// Node is read afresh, which also catches up after any event lost.
const watchTimeout = 5 * time.Minute

// run keeps the Node current until ctx ends, telling changed after every
// read and event.
func (n *nodeSource) run(ctx context.Context, changed chan<- struct{}) {
	backoff := time.Second
	for ctx.Err() == nil {
		if err := n.read(ctx); err != nil {
			notify(changed)
			if !sleep(ctx, backoff) {
				return
			}
			backoff = min(2*backoff, 30*time.Second)
			continue
		}
		backoff = time.Second
		notify(changed)
		n.mu.Lock()
		rv := n.node.Metadata.ResourceVersion
		n.mu.Unlock()
		q := url.Values{
			"watch":           {"true"},
			"fieldSelector":   {"metadata.name=" + n.name},
			"resourceVersion": {rv},
			"timeoutSeconds":  {strconv.Itoa(int(watchTimeout.Seconds()))},
		}
		err := n.api.Watch(ctx, "/api/v1/nodes?"+q.Encode(), func(ev kubeapi.WatchEvent) error {
			switch ev.Type {
			case "ADDED", "MODIFIED":
				var node nodeMeta
				if err := json.Unmarshal(ev.Object, &node); err != nil {
					return fmt.Errorf("watch node %s: unreadable event: %w", n.name, err)
				}
				n.set(&node, nil)
				notify(changed)
			case "ERROR": // 410 Gone: the version is too old; read again
				return fmt.Errorf("watch node %s: %s", n.name, ev.Object)
			}
			return nil
		})
		if err != nil && ctx.Err() == nil && !sleep(ctx, time.Second) {
			return
		}
	}
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// nodeReporter writes what the agent did to its Node: Events, and the
// labels that count the GPUs on each side.
type nodeReporter struct {
	api  *kubeapi.Client
	node *nodeSource
}

// event posts an Event about the Node, in the default namespace where the
// kubelet posts the Node's own.
func (r *nodeReporter) event(ctx context.Context, warning bool, reason, message string) error {
	typ := "Normal"
	if warning {
		typ = "Warning"
	}
	now := time.Now().UTC().Format(time.RFC3339)
	name := r.node.name
	ev := map[string]any{
		"apiVersion": "v1",
		"kind":       "Event",
		"metadata":   map[string]any{"generateName": name + ".vfio-manager.", "namespace": "default"},
		"involvedObject": map[string]any{
			"apiVersion": "v1", "kind": "Node", "name": name, "uid": r.node.uid(),
		},
		"reason":             reason,
		"message":            message,
		"type":               typ,
		"source":             map[string]any{"component": "vfio-manager", "host": name},
		"reportingComponent": "gpu-sandbox.io/vfio-manager",
		"reportingInstance":  name,
		"firstTimestamp":     now,
		"lastTimestamp":      now,
		"count":              1,
	}
	if err := r.api.Create(ctx, "/api/v1/namespaces/default/events", ev); err != nil {
		return fmt.Errorf("post event %s on node %s: %w", reason, name, err)
	}
	return nil
}

// counts sets the count labels when they differ from the Node's.
func (r *nodeReporter) counts(ctx context.Context, vm, container int) error {
	want := map[string]string{VMCountLabel: strconv.Itoa(vm), ContainerCountLabel: strconv.Itoa(container)}
	have := r.node.labels()
	if have != nil && have[VMCountLabel] == want[VMCountLabel] && have[ContainerCountLabel] == want[ContainerCountLabel] {
		return nil
	}
	patch := map[string]any{"metadata": map[string]any{"labels": want}}
	if err := r.api.MergePatch(ctx, "/api/v1/nodes/"+url.PathEscape(r.node.name), patch); err != nil {
		return fmt.Errorf("label node %s: %w", r.node.name, err)
	}
	return nil
}
