package testbed

import (
	"bytes"
	"sync"
)

// Output collects a process's stdout and stderr while a test or the demo
// reads it; it is safe for the writing and the reading goroutine at once.
type Output struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (o *Output) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.b.Write(p)
}

func (o *Output) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.b.String()
}
