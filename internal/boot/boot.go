// Package boot tells which boot of the node this is and where on its clock
// we are: the clock that process start times in /proc are read on, which
// wall-clock steps do not move.
package boot

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// idFile is the kernel's random identity of the running boot.
const idFile = "/proc/sys/kernel/random/boot_id"

// ticksPerSecond is USER_HZ, the unit of start times in /proc/<pid>/stat:
// 100 on every architecture Linux runs containers on.
const ticksPerSecond = 100

// Tick is the precision of process start times.
const Tick = time.Second / ticksPerSecond

// ID returns the identity of the running boot.
func ID() (string, error) {
	b, err := os.ReadFile(idFile)
	if err != nil {
		return "", fmt.Errorf("read boot id: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// Since returns the time since boot, suspended time included.
func Since() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

// ProcessStart returns when a process started, as time since boot, from
// <procRoot>/<pid>/stat; the kernel keeps it to a tick (10 ms).
func ProcessStart(procRoot string, pid int) (time.Duration, error) {
	path := procRoot + "/" + strconv.Itoa(pid) + "/stat"
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, fmt.Errorf("start time of pid %d: %w", pid, err)
	}
	// The command name, in parentheses, may hold spaces: fields count from
	// the last ')'. starttime is field 22, the 20th after it.
	i := strings.LastIndexByte(string(b), ')')
	fields := strings.Fields(string(b[i+1:]))
	if i < 0 || len(fields) < 20 {
		return 0, fmt.Errorf("start time of pid %d: %q is not a stat line", pid, path)
	}
	ticks, err := strconv.ParseUint(fields[19], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("start time of pid %d: %w", pid, err)
	}
	return time.Duration(ticks) * time.Second / ticksPerSecond, nil
}
