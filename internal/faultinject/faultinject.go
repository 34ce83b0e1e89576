//go:build !faultinject

// Package faultinject marks the points where a crash would leave the node
// between two states, so that tests can kill an agent at each of them. In a
// normal build Point does nothing and costs nothing; binaries built with
// the faultinject tag die with SIGKILL at the point that
// GPU_SANDBOX_KILL_AT names (1 for the first point reached, 2 for the
// second, ...).
package faultinject

// Point marks a place where the process may be killed.
func Point(string) {}
