package e2e

import (
	"bytes"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	nodev1 "k8s.io/api/node/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"

	"github.com/gpu-sandbox/gpu-sandbox/internal/katamanager"
	"github.com/gpu-sandbox/gpu-sandbox/internal/sandboxplugin"
)

// decodeStrict decodes one YAML document the way the API server does:
// case-sensitive, no unknown or duplicate fields.
func decodeStrict(doc []byte, into any) error {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return err
	}
	strict, err := kjson.UnmarshalStrict(j, into, kjson.DisallowDuplicateFields, kjson.DisallowUnknownFields)
	if err == nil && len(strict) > 0 {
		err = errors.Join(strict...)
	}
	return err
}

type manifests struct {
	daemonSets     map[string]*appsv1.DaemonSet
	configMaps     map[string]*corev1.ConfigMap
	runtimeClasses map[string]*nodev1.RuntimeClass
	serviceAccount map[string]*corev1.ServiceAccount
	roles          []*rbacv1.Role
	clusterRoles   map[string]*rbacv1.ClusterRole
	clusterBinds   []*rbacv1.ClusterRoleBinding
	pods           []*corev1.Pod
}

func loadManifests(t *testing.T) *manifests {
	t.Helper()
	dir := filepath.Join(repoRoot(), "deployments", "manifests")
	var kust struct {
		APIVersion string   `json:"apiVersion"`
		Kind       string   `json:"kind"`
		Namespace  string   `json:"namespace"`
		Resources  []string `json:"resources"`
		Images     []struct {
			Name   string `json:"name"`
			NewTag string `json:"newTag"`
		} `json:"images"`
	}
	b, err := os.ReadFile(filepath.Join(dir, "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := decodeStrict(b, &kust); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "*.yaml"))
	for _, f := range files {
		if base := filepath.Base(f); base != "kustomization.yaml" && !slices.Contains(kust.Resources, base) {
			t.Errorf("%s is not listed in kustomization.yaml", base)
		}
	}
	m := &manifests{daemonSets: map[string]*appsv1.DaemonSet{}, configMaps: map[string]*corev1.ConfigMap{},
		runtimeClasses: map[string]*nodev1.RuntimeClass{}, serviceAccount: map[string]*corev1.ServiceAccount{},
		clusterRoles: map[string]*rbacv1.ClusterRole{}}
	samples, _ := filepath.Glob(filepath.Join(dir, "samples", "*.yaml"))
	for _, f := range append(slices.Clone(kust.Resources), samples...) {
		path := f
		if !filepath.IsAbs(f) {
			path = filepath.Join(dir, f)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range bytes.Split(b, []byte("\n---\n")) {
			var meta struct {
				APIVersion string `json:"apiVersion"`
				Kind       string `json:"kind"`
			}
			if err := yaml.Unmarshal(doc, &meta); err != nil {
				t.Fatalf("%s #%d: %v", f, i, err)
			}
			var obj any
			switch meta.APIVersion + " " + meta.Kind {
			case "apps/v1 DaemonSet":
				obj = &appsv1.DaemonSet{}
			case "v1 ConfigMap":
				obj = &corev1.ConfigMap{}
			case "v1 Namespace":
				obj = &corev1.Namespace{}
			case "v1 ServiceAccount":
				obj = &corev1.ServiceAccount{}
			case "v1 Pod":
				obj = &corev1.Pod{}
			case "rbac.authorization.k8s.io/v1 Role":
				obj = &rbacv1.Role{}
			case "rbac.authorization.k8s.io/v1 RoleBinding":
				obj = &rbacv1.RoleBinding{}
			case "rbac.authorization.k8s.io/v1 ClusterRole":
				obj = &rbacv1.ClusterRole{}
			case "rbac.authorization.k8s.io/v1 ClusterRoleBinding":
				obj = &rbacv1.ClusterRoleBinding{}
			case "node.k8s.io/v1 RuntimeClass":
				obj = &nodev1.RuntimeClass{}
			default:
				t.Fatalf("%s #%d: unexpected %s %s", f, i, meta.APIVersion, meta.Kind)
			}
			if err := decodeStrict(doc, obj); err != nil {
				t.Fatalf("%s #%d (%s): %v", f, i, meta.Kind, err)
			}
			switch o := obj.(type) {
			case *appsv1.DaemonSet:
				m.daemonSets[o.Name] = o
			case *corev1.ConfigMap:
				m.configMaps[o.Name] = o
			case *nodev1.RuntimeClass:
				m.runtimeClasses[o.Name] = o
			case *corev1.ServiceAccount:
				m.serviceAccount[o.Name] = o
			case *rbacv1.Role:
				m.roles = append(m.roles, o)
			case *rbacv1.ClusterRole:
				m.clusterRoles[o.Name] = o
			case *rbacv1.ClusterRoleBinding:
				m.clusterBinds = append(m.clusterBinds, o)
			case *corev1.Pod:
				m.pods = append(m.pods, o)
			}
		}
	}
	for _, img := range kust.Images {
		for _, ds := range m.daemonSets {
			for _, c := range ds.Spec.Template.Spec.Containers {
				if name, tag, _ := strings.Cut(c.Image, ":"); name == img.Name && tag != img.NewTag {
					t.Errorf("%s uses %s, kustomization sets tag %s", ds.Name, c.Image, img.NewTag)
				}
			}
		}
	}
	return m
}

var flagRE = regexp.MustCompile(`--([a-z0-9-]+)`)

func TestManifests(t *testing.T) {
	m := loadManifests(t)
	var tags []string
	for _, agent := range agents {
		ds := m.daemonSets[agent]
		if ds == nil {
			t.Fatalf("no DaemonSet %s", agent)
		}
		spec := ds.Spec.Template.Spec
		if spec.NodeSelector["nvidia.com/gpu.deploy."+agent] != "true" {
			t.Errorf("%s: node selector %v; want nvidia.com/gpu.deploy.%s=true", agent, spec.NodeSelector, agent)
		}
		if m.serviceAccount[spec.ServiceAccountName] == nil {
			t.Errorf("%s: service account %q not defined", agent, spec.ServiceAccountName)
		}
		if len(spec.Containers) != 1 {
			t.Fatalf("%s: %d containers", agent, len(spec.Containers))
		}
		c := spec.Containers[0]
		image, tag, _ := strings.Cut(c.Image, ":")
		if image != "ghcr.io/gpu-sandbox/"+agent {
			t.Errorf("%s: image %s", agent, c.Image)
		}
		tags = append(tags, tag)
		if c.ReadinessProbe == nil {
			t.Errorf("%s: no readiness probe", agent)
		}
		if c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
			t.Errorf("%s: not privileged", agent)
		}

		// Every flag and variable the container sets is one the binary knows.
		help := run(t, agent, nil, "--help")
		var args []string
		args = append(args, c.Args...)
		if c.ReadinessProbe != nil && c.ReadinessProbe.Exec != nil {
			args = append(args, c.ReadinessProbe.Exec.Command...)
		}
		if c.Lifecycle != nil && c.Lifecycle.PreStop != nil && c.Lifecycle.PreStop.Exec != nil {
			args = append(args, c.Lifecycle.PreStop.Exec.Command...)
		}
		for _, a := range args {
			for _, f := range flagRE.FindAllStringSubmatch(a, -1) {
				if !strings.Contains(help.stdout, "--"+f[1]+" ") && !strings.Contains(help.stdout, "--"+f[1]+"[") {
					t.Errorf("%s: flag --%s is not in %s --help", agent, f[1], agent)
				}
			}
		}
		for _, e := range c.Env {
			// --help lists a flag's variables as [$NAME] or [$NAME, $OTHER].
			if e.Name != "POD_NAMESPACE" && !strings.Contains(help.stdout, "$"+e.Name+"]") && !strings.Contains(help.stdout, "$"+e.Name+",") {
				t.Errorf("%s: variable %s is not in %s --help", agent, e.Name, agent)
			}
		}
		// Every mount has a volume, and paths the agent is told about are mounted.
		volumes := map[string]corev1.Volume{}
		for _, v := range spec.Volumes {
			volumes[v.Name] = v
		}
		var mounts []string
		for _, vm := range c.VolumeMounts {
			if _, ok := volumes[vm.Name]; !ok {
				t.Errorf("%s: mount %s has no volume", agent, vm.Name)
			}
			mounts = append(mounts, vm.MountPath)
		}
		// The kubelet mounts the termination message file, by default
		// /dev/termination-log, into the container: under a host /dev
		// mounted read-only the container cannot start, under a writable
		// one the file lands in the host's /dev (issue 18: the first real
		// kubelet that ran the plugin's DaemonSet refused it).
		msg := c.TerminationMessagePath
		if msg == "" {
			msg = corev1.TerminationMessagePathDefault
		}
		for _, mp := range mounts {
			if msg == mp || strings.HasPrefix(msg, mp+"/") {
				t.Errorf("%s: the termination message file %s is under the mount %s", agent, msg, mp)
			}
		}
		for _, e := range c.Env {
			if !strings.HasPrefix(e.Value, "/") {
				continue
			}
			if !slices.ContainsFunc(mounts, func(mp string) bool { return e.Value == mp || strings.HasPrefix(e.Value, mp+"/") }) {
				t.Errorf("%s: %s=%s is not under any mount %v", agent, e.Name, e.Value, mounts)
			}
		}
	}
	if len(slices.Compact(slices.Clone(tags))) != 1 {
		t.Errorf("image tags differ: %v", tags)
	}
	// Bindings are node state: a rollout must not take GPUs out of running VMs.
	vm := m.daemonSets["vfio-manager"].Spec.Template.Spec
	if l := vm.Containers[0].Lifecycle; l != nil && l.PreStop != nil {
		t.Errorf("vfio-manager: a preStop hook (%v) runs on every rollout", l.PreStop.Exec)
	}
	if !vm.HostPID {
		t.Error("vfio-manager: the in-use check needs the host's processes (hostPID)")
	}
	if !m.daemonSets["kata-manager"].Spec.Template.Spec.HostPID {
		t.Error("kata-manager: restart by signal needs hostPID")
	}

	// kata-manager's configuration parses as the agent reads it, and each
	// of its runtime classes has a RuntimeClass with the same handler.
	cm := m.configMaps["kata-manager-config"]
	if cm == nil {
		t.Fatal("no kata-manager ConfigMap")
	}
	cfg, err := katamanager.ParseConfig([]byte(cm.Data["config.yaml"]), "ConfigMap")
	if err != nil {
		t.Fatal(err)
	}
	for _, rc := range cfg.RuntimeClasses {
		if r := m.runtimeClasses[rc.Name]; r == nil || r.Handler != rc.Name || r.Scheduling == nil ||
			r.Scheduling.NodeSelector["nvidia.com/gpu.workload.config"] != "vm-passthrough" {
			t.Errorf("runtime class %s: RuntimeClass %+v", rc.Name, r)
		}
	}
	for _, name := range []string{"kata-qemu-nvidia-gpu", "kata-qemu-nvidia-gpu-snp"} {
		if m.runtimeClasses[name] == nil {
			t.Errorf("RuntimeClass %s missing", name)
		}
	}
	km := m.daemonSets["kata-manager"].Spec.Template.Spec.Containers[0]
	if env(km, "CONFIG_FILE") != filepath.Join(mountOf(t, km, "config"), "config.yaml") {
		t.Errorf("CONFIG_FILE %s is not the ConfigMap's config.yaml", env(km, "CONFIG_FILE"))
	}
	if !strings.HasPrefix(cfg.ArtifactsDir, mountOf(t, km, "artifacts")) {
		t.Errorf("artifactsDir %s is not under the artifacts mount", cfg.ArtifactsDir)
	}

	// The sample pod asks for what the device plugin advertises.
	plugin := m.daemonSets["sandbox-device-plugin"].Spec.Template.Spec.Containers[0]
	alias := sandboxplugin.ResourceVendor + "/" + env(plugin, "P_GPU_ALIAS")
	for _, pod := range m.pods {
		if m.runtimeClasses[*pod.Spec.RuntimeClassName] == nil {
			t.Errorf("sample %s: runtime class %s not defined", pod.Name, *pod.Spec.RuntimeClassName)
		}
		for r := range pod.Spec.Containers[0].Resources.Limits {
			if string(r) != alias {
				t.Errorf("sample %s asks for %s; the plugin advertises %s", pod.Name, r, alias)
			}
		}
		// A GPU limit and a CDI annotation naming a GPU give the VM two:
		// the one the kubelet chose (through Allocate) and one that may be
		// another pod's.
		for k, v := range pod.Annotations {
			if strings.HasPrefix(k, "cdi.k8s.io/") && len(pod.Spec.Containers[0].Resources.Limits) > 0 {
				t.Errorf("sample %s: CDI annotation %s=%s next to a GPU limit", pod.Name, k, v)
			}
		}
	}
	// kata-manager reads secrets in its namespace, only get.
	for _, r := range m.roles {
		for _, rule := range r.Rules {
			if !slices.Equal(rule.Resources, []string{"secrets"}) || !slices.Equal(rule.Verbs, []string{"get"}) {
				t.Errorf("role %s grants %v on %v", r.Name, rule.Verbs, rule.Resources)
			}
		}
	}
	// vfio-manager follows its Node's policy (NODE_POLICY, with the
	// node's name from the downward API): exactly what the agent's
	// --node-policy help says it needs, and no more; nobody else holds a
	// cluster-wide grant.
	vmc := m.daemonSets["vfio-manager"].Spec.Template.Spec.Containers[0]
	if env(vmc, "NODE_POLICY") != "true" {
		t.Error("vfio-manager: NODE_POLICY is not true")
	}
	if !slices.ContainsFunc(vmc.Env, func(e corev1.EnvVar) bool {
		return e.Name == "NODE_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName"
	}) {
		t.Error("vfio-manager: NODE_NAME is not the downward API's spec.nodeName")
	}
	if a := m.serviceAccount["vfio-manager"].AutomountServiceAccountToken; a != nil && !*a {
		t.Error("vfio-manager: its service account mounts no token")
	}
	if a := vm.AutomountServiceAccountToken; a != nil && !*a {
		t.Error("vfio-manager: the pod mounts no service account token")
	}
	help := run(t, "vfio-manager", nil, "--help").stdout
	granted := map[string]bool{}
	for _, b := range m.clusterBinds {
		r := m.clusterRoles[b.RoleRef.Name]
		if r == nil || len(b.Subjects) != 1 || b.Subjects[0].Kind != "ServiceAccount" || b.Subjects[0].Name != "vfio-manager" {
			t.Errorf("cluster role binding %s: %+v to %s", b.Name, b.Subjects, b.RoleRef.Name)
			continue
		}
		for _, rule := range r.Rules {
			for _, res := range rule.Resources {
				for _, verb := range rule.Verbs {
					granted[verb+" "+res] = true
				}
			}
		}
	}
	want := []string{"get nodes", "watch nodes", "patch nodes", "create events"}
	if got := slices.Sorted(maps.Keys(granted)); !slices.Equal(got, slices.Sorted(slices.Values(want))) {
		t.Errorf("vfio-manager is granted %v; want %v", got, want)
	}
	if !strings.Contains(help, "get, watch and patch nodes and create events") {
		t.Error("vfio-manager --help no longer says what --node-policy needs: update the ClusterRole with it")
	}
}

func env(c corev1.Container, name string) string {
	for _, e := range c.Env {
		if e.Name == name {
			return e.Value
		}
	}
	return ""
}

func mountOf(t *testing.T, c corev1.Container, volume string) string {
	for _, vm := range c.VolumeMounts {
		if vm.Name == volume {
			return vm.MountPath
		}
	}
	t.Fatalf("container %s has no mount of %s", c.Name, volume)
	return ""
}
