package atomicfile_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/gpu-sandbox/gpu-sandbox/internal/atomicfile"
)

func TestWriteFile(t *testing.T) {
	dir := t.TempDir()
	name := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(name, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := atomicfile.WriteFile(name, []byte("new"), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(name)
	if err != nil || string(got) != "new" {
		t.Fatalf("content %q, %v", got, err)
	}
	if fi, _ := os.Stat(name); fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600 whatever the umask and the old file's mode", fi.Mode().Perm())
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("temporary files left: %v", entries)
	}
}

func TestWriteFileFailureKeepsOldContent(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "no", "such", "dir", "f")
	if err := atomicfile.WriteFile(missing, []byte("x"), 0o644); err == nil {
		t.Fatal("write into a missing directory succeeded")
	}
	// A rename onto a directory fails after the temporary file was written:
	// the old content stays and the temporary file goes.
	target := filepath.Join(dir, "target")
	if err := os.MkdirAll(filepath.Join(target, "child"), 0o755); err != nil {
		t.Fatal(err)
	}
	err := atomicfile.WriteFile(target, []byte("x"), 0o644)
	if err == nil {
		t.Fatal("rename over a non-empty directory succeeded")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 || entries[0].Name() != "target" {
		t.Errorf("after a failed write the directory holds %v", entries)
	}
}

func TestWriteFileIfChanged(t *testing.T) {
	name := filepath.Join(t.TempDir(), "spec.yaml")
	for i, tc := range []struct {
		data  string
		mode  os.FileMode
		wrote bool
	}{
		{"a", 0o644, true},
		{"a", 0o644, false},
		{"a", 0o600, true}, // the mode counts too
		{"b", 0o600, true},
	} {
		wrote, err := atomicfile.WriteFileIfChanged(name, []byte(tc.data), tc.mode)
		if err != nil || wrote != tc.wrote {
			t.Errorf("step %d: wrote %v, %v; want %v", i, wrote, err, tc.wrote)
		}
	}
}

func TestRemove(t *testing.T) {
	name := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(name, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for range 2 { // the second time the file is already gone: not an error
		if err := atomicfile.Remove(name); err != nil {
			t.Fatal(err)
		}
	}
}
