package readiness

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestMarkCheckClear(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "ready")
	if err := Check(path); !errors.Is(err, ErrNotReady) {
		t.Fatalf("no marker: %v", err)
	}
	if err := Mark(path); err != nil {
		t.Fatal(err)
	}
	if err := Check(path); err != nil {
		t.Fatalf("fresh marker: %v", err)
	}
	for name, body := range map[string]string{
		"another boot": "boot_id=00000000-0000-0000-0000-000000000000\npid=1\n",
		"no boot":      "pid=1\n",
		"not a marker": "ready\n",
	} {
		os.WriteFile(path, []byte(body), 0o644)
		if err := Check(path); !errors.Is(err, ErrNotReady) {
			t.Errorf("%s: %v; want ErrNotReady", name, err)
		}
	}
	if err := Clear(path); err != nil {
		t.Fatal(err)
	}
	if err := Clear(path); err != nil {
		t.Fatalf("clearing twice: %v", err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("marker still there: %v", err)
	}
}
