// Package version holds the build's version, set by the Makefile through
// -ldflags "-X github.com/gpu-sandbox/gpu-sandbox/internal/version.Version=...".
package version

// Version is the release or git description the binary was built from.
var Version = "devel"
