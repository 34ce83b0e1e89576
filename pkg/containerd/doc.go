// Package containerd registers container runtimes (Kata Containers runtime
// classes) in containerd's configuration and takes them out again, and
// restarts containerd so that it reads them.
//
// It knows the three configuration schemas: version 1 (plugin "cri"),
// version 2 (containerd 1.x, "io.containerd.grpc.v1.cri") and version 3
// (containerd 2.x, "io.containerd.cri.v1.runtime"), and that containerd 1.x
// replaces a plugin's table wholesale with an imported one while 2.x merges
// them: a drop-in written for 1.x carries a copy of the main CRI table, one
// for 2.x only the new entries. Setting any runtime replaces containerd's
// built-in runtimes map, so the built-in runc is spelled out when the
// configuration relies on it.
//
// The main configuration is edited as text on the drop-in route (only its
// imports change), and every file is written atomically with the original
// kept, so that Revert gives the administrator's file back.
package containerd
