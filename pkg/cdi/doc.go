// Package cdi generates Container Device Interface specs for VFIO
// passthrough devices and writes them where container runtimes look for
// them, on the CDI library (tags.cncf.io/container-device-interface).
//
// A spec names each passthrough device (an IOMMU group held by vfio drivers)
// by its device-plugin ID, the PCI address of its GPU; the spec of kind
// nvidia.com/pgpu also names each by its index in address order
// (nvidia.com/pgpu=0), as the GPU Operator's documentation does. In legacy
// mode a device brings its group node /dev/vfio/<group> and every container
// /dev/vfio/vfio; in iommufd mode each function's /dev/vfio/devices/vfioN
// and /dev/iommu. Device numbers are taken from sysfs so that runtimes need
// not stat the nodes.
//
// Specs are deterministic: the same devices give the same bytes, and Writer
// writes only when the bytes change.
package cdi
