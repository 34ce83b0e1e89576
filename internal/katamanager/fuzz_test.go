package katamanager

import "testing"

// Any configuration file either parses into runtime classes with valid
// names and references, or is refused with a usage error; none panics.
func FuzzParseConfig(f *testing.F) {
	f.Add([]byte("artifactsDir: /opt/a\nruntimeClasses:\n- name: kata-qemu-nvidia-gpu\n  nodeSelector: {}\n  artifacts:\n    url: nvcr.io/nvidia/k:v\n    pullSecret: \"\"\n"))
	f.Add([]byte("runtimeClasses:\n- name: a\n  artifacts: {url: r/x@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef, plainHTTP: true}\n"))
	f.Add([]byte("{\"runtimeClasses\": [{\"name\": \"x\", \"artifacts\": {\"url\": \"h:1/r\"}}]}"))
	f.Add([]byte("runtimeClasses: [\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseConfig(b, "fuzz")
		if err != nil {
			return
		}
		for _, rc := range c.RuntimeClasses {
			if !dnsLabel.MatchString(rc.Name) || rc.Artifacts.URL == "" {
				t.Fatalf("accepted %+v", rc)
			}
		}
	})
}
