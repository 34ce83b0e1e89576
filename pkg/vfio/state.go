package vfio

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/gpu-sandbox/gpu-sandbox/internal/atomicfile"
)

// record is what the state dir keeps about a device bound to VFIO.
type record struct {
	Address string `json:"address"`
	// Driver held the device before; "" when it had none.
	Driver string `json:"driver"`
	// Module provides Driver ("" when unknown: records of older versions),
	// loaded again if the driver is gone when the device goes back.
	Module string `json:"module,omitempty"`
	// BoundTo is the vfio driver it was given to.
	BoundTo string `json:"boundTo"`
}

type stateStore struct {
	dir string
}

func (s stateStore) path(address string) string {
	return filepath.Join(s.dir, address+".json")
}

// clean removes what a write that died half-way left in the directory.
func (s stateStore) clean() {
	matches, _ := filepath.Glob(filepath.Join(s.dir, ".*.json.tmp-*"))
	for _, m := range matches {
		os.Remove(m)
	}
}

func (s stateStore) save(r record) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return fmt.Errorf("create state dir %q: %w", s.dir, err)
	}
	return atomicfile.WriteFile(s.path(r.Address), append(b, '\n'), 0o600)
}

// load returns the device's record, or an error wrapping ErrNoState when it
// is missing or unreadable.
func (s stateStore) load(address string) (record, error) {
	var r record
	b, err := os.ReadFile(s.path(address))
	if errors.Is(err, fs.ErrNotExist) {
		return r, fmt.Errorf("%w for %s in %q", ErrNoState, address, s.dir)
	}
	if err != nil {
		return r, fmt.Errorf("%w for %s: %w", ErrNoState, address, err)
	}
	if err := json.Unmarshal(b, &r); err != nil || r.Address != address {
		return record{}, fmt.Errorf("%w for %s: %q is corrupt", ErrNoState, address, s.path(address))
	}
	return r, nil
}

func (s stateStore) remove(address string) error {
	return atomicfile.Remove(s.path(address))
}
