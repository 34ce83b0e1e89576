package vfiotest

import "testing"

// New builds the node in a temporary directory of tb, starts its emulator,
// and stops it when the test ends, failing the test if the emulator met an
// error.
func New(tb testing.TB, n Node) (*Tree, *Emulator) {
	tb.Helper()
	t, err := Build(tb.TempDir(), n)
	if err != nil {
		tb.Fatal(err)
	}
	e, err := t.Start()
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := e.Close(); err != nil {
			tb.Errorf("vfiotest emulator: %v", err)
		}
	})
	return t, e
}
