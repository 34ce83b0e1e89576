// Package atomicfile is the project's single way of writing a file that
// another process (containerd, a running VM, the kubelet, our own next start)
// may read at any moment: readers see the old bytes or the new bytes, never a
// mix, and a crash at any point leaves one of the two on disk.
package atomicfile

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/gpu-sandbox/gpu-sandbox/internal/faultinject"
)

// WriteFile replaces name with data. The bytes go to a temporary file in the
// same directory, which is synced, closed, given perm and renamed over name;
// the directory is synced last so the rename itself survives a power cut. The
// temporary file is removed on every error path.
func WriteFile(name string, data []byte, perm fs.FileMode) (err error) {
	dir := filepath.Dir(name)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(name)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %q: %w", name, err)
	}
	defer func() {
		if err != nil {
			_ = tmp.Close()
			_ = os.Remove(tmp.Name())
			err = fmt.Errorf("write %q: %w", name, err)
		}
	}()
	// CreateTemp uses 0600; Chmod (not the umask) decides the final mode.
	if err = tmp.Chmod(perm); err != nil {
		return err
	}
	if _, err = tmp.Write(data); err != nil {
		return err
	}
	faultinject.Point("atomicfile: written " + name)
	if err = tmp.Sync(); err != nil {
		return err
	}
	if err = tmp.Close(); err != nil {
		return err
	}
	faultinject.Point("atomicfile: synced " + name)
	if err = os.Rename(tmp.Name(), name); err != nil {
		return err
	}
	faultinject.Point("atomicfile: renamed " + name)
	return syncDir(dir)
}

// WriteFileIfChanged writes data only when name does not already hold exactly
// these bytes with this mode. It reports whether it wrote.
func WriteFileIfChanged(name string, data []byte, perm fs.FileMode) (bool, error) {
	if fi, err := os.Stat(name); err == nil && fi.Mode().Perm() == perm.Perm() {
		if old, err := os.ReadFile(name); err == nil && bytes.Equal(old, data) {
			return false, nil
		}
	}
	if err := WriteFile(name, data, perm); err != nil {
		return false, err
	}
	return true, nil
}

// Remove deletes name and syncs its directory. A file that is already gone is
// not an error.
func Remove(name string) error {
	faultinject.Point("atomicfile: remove " + name)
	if err := os.Remove(name); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("remove %q: %w", name, err)
	}
	return syncDir(filepath.Dir(name))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync directory %q: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync directory %q: %w", dir, err)
	}
	return nil
}

// Sync makes a file that another library wrote by rename durable: it syncs
// the file, then its directory. Used where a library must do the writing
// itself (the CDI cache validates the spec it writes).
func Sync(name string) error {
	f, err := os.Open(name)
	if err != nil {
		return fmt.Errorf("sync %q: %w", name, err)
	}
	err = f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sync %q: %w", name, err)
	}
	return syncDir(filepath.Dir(name))
}

// RemoveTemps removes the temporary files that WriteFile calls for name left
// behind when the process died before renaming them.
func RemoveTemps(name string) error {
	matches, err := filepath.Glob(filepath.Join(filepath.Dir(name), "."+filepath.Base(name)+".tmp-*"))
	if err != nil {
		return err
	}
	for _, m := range matches {
		if err := os.Remove(m); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove stale %q: %w", m, err)
		}
	}
	return nil
}
