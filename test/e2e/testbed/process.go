package testbed

import (
	"os/exec"
	"syscall"
	"time"
)

// Stop ends a started agent as the kubelet does: SIGTERM, then SIGKILL
// after a grace period of 30 s. A process already waited for is left alone.
func Stop(cmd *exec.Cmd) {
	if cmd.ProcessState != nil {
		return
	}
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		<-done
	}
}
