//go:build faultinject

package faultinject

import (
	"fmt"
	"os"
	"strconv"
	"sync/atomic"
	"syscall"
)

// Env names the point to die at; EnvLog, when set, is a file where every
// point reached is appended.
const (
	Env    = "GPU_SANDBOX_KILL_AT"
	EnvLog = "GPU_SANDBOX_KILL_LOG"
)

var (
	reached atomic.Int64
	killAt  = func() int64 { n, _ := strconv.ParseInt(os.Getenv(Env), 10, 64); return n }()
)

// Point counts the points reached and kills the process at the chosen one.
func Point(name string) {
	n := reached.Add(1)
	if log := os.Getenv(EnvLog); log != "" {
		if f, err := os.OpenFile(log, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600); err == nil {
			fmt.Fprintf(f, "%d %s\n", n, name)
			f.Close()
		}
	}
	if n == killAt {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // the signal is on its way
	}
}
