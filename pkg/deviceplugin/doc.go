// Package deviceplugin serves one extended resource to the kubelet through
// the v1beta1 device-plugin API: it listens on a unix socket in the
// kubelet's plugin directory, registers with kubelet.sock, streams the
// device list on every change, and registers again whenever the kubelet
// restarts (kubelet.sock re-created) or wipes the directory. It knows
// nothing of GPUs: an Allocator says what a container gets.
//
// Each start builds a fresh listener and gRPC server; Run returns when its
// context ends, with the socket removed and every goroutine it started
// finished.
package deviceplugin
