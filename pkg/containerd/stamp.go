package containerd

import (
	"time"

	"github.com/gpu-sandbox/gpu-sandbox/internal/boot"
)

// Stamp is a moment on the node's boot clock, the clock process start
// times are kept on: comparable with when containerd started, whatever the
// wall clock did in between.
type Stamp struct {
	BootID    string        `json:"bootID"`
	SinceBoot time.Duration `json:"sinceBoot"`
}

func now() *Stamp {
	id, _ := boot.ID()
	return &Stamp{BootID: id, SinceBoot: boot.Since()}
}
