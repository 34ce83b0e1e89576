package testbed

import (
	"fmt"
	"os"
)

// Harness is a T for programs that are not tests (the demo, the
// benchmarks): Fatal ends Run with the error, Cleanup functions run at
// Close, temporary directories live under Dir.
type Harness struct {
	Dir      string
	cleanups []func()
}

type failure struct{ err error }

// NewHarness makes a harness whose files go under a new directory with a
// short path (unix sockets live there).
func NewHarness(prefix string) (*Harness, error) {
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		return nil, err
	}
	return &Harness{Dir: dir}, nil
}

func (h *Harness) Helper()                   {}
func (h *Harness) Fatal(args ...any)         { panic(failure{fmt.Errorf("%s", fmt.Sprint(args...))}) }
func (h *Harness) Fatalf(f string, a ...any) { panic(failure{fmt.Errorf(f, a...)}) }
func (h *Harness) Cleanup(f func())          { h.cleanups = append(h.cleanups, f) }
func (h *Harness) Failed() bool              { return false }
func (h *Harness) Logf(string, ...any)       {}

// TempDir returns a new directory under Dir.
func (h *Harness) TempDir() string {
	dir, err := os.MkdirTemp(h.Dir, "t")
	if err != nil {
		h.Fatal(err)
	}
	return dir
}

// Run calls f, turning a Fatal inside it into its error.
func (h *Harness) Run(f func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			fail, ok := r.(failure)
			if !ok {
				panic(r)
			}
			err = fail.err
		}
	}()
	return f()
}

// Close runs the cleanups, last first, and removes Dir.
func (h *Harness) Close() {
	for i := len(h.cleanups) - 1; i >= 0; i-- {
		h.cleanups[i]()
	}
	h.cleanups = nil
	os.RemoveAll(h.Dir)
}
