package vfio

import (
	"sync"

	"github.com/NVIDIA/go-nvlib/pkg/pciids"
)

// Names looks up device names in the pci.ids database. The database is parsed
// once, on first use, and shared by every lookup.
type Names struct {
	path string
	once sync.Once
	db   pciids.Interface
}

// NewNames returns a lookup on the pci.ids file at path, or when path is ""
// on the system's copy, falling back to the one built into go-nvlib.
func NewNames(path string) *Names {
	return &Names{path: path}
}

// Name returns the device's pci.ids name (e.g. "GH100 [H100 SXM5 80GB]"),
// or "" when the database does not know it.
func (n *Names) Name(vendor, device uint16) string {
	n.once.Do(func() {
		var opts []pciids.Option
		if n.path != "" {
			opts = append(opts, pciids.WithFilePath(n.path))
		}
		n.db = pciids.NewDB(opts...)
	})
	name, err := n.db.GetDeviceName(vendor, device)
	if err != nil {
		return ""
	}
	return name
}
