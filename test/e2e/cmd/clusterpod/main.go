// Command clusterpod is the one program of the cluster test's pod image.
// Without arguments it is the pod sandbox's pause process. With
// "hold DIR" it is the consumer of a pod that was given GPUs: it opens
// every device node in DIR, prints each one's path and device number
// ("/dev/vfio/21 243:0"), and keeps them open until it is stopped, as a
// VMM keeps its VFIO groups. The nodes are opened with O_PATH: they name
// the fake kernel's numbers, which no driver on the test machine answers,
// and an O_PATH descriptor is still an open file that /proc/PID/fd shows.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) == 3 && os.Args[1] == "hold" {
		if err := hold(os.Args[2]); err != nil {
			fmt.Fprintln(os.Stderr, "clusterpod:", err)
			os.Exit(1)
		}
	} else if len(os.Args) != 1 {
		fmt.Fprintln(os.Stderr, "usage: clusterpod [hold DIR]")
		os.Exit(2)
	}
	pause()
}

func hold(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		path := filepath.Join(dir, e.Name())
		var st unix.Stat_t
		if err := unix.Stat(path, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR {
			continue
		}
		// Kept open for the life of the process: never closed.
		if _, err := unix.Open(path, unix.O_PATH|unix.O_CLOEXEC, 0); err != nil {
			return fmt.Errorf("open %s: %w", path, err)
		}
		fmt.Printf("%s %d:%d\n", path, unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	fmt.Println("holding")
	return nil
}

// pause waits for SIGTERM or SIGINT and reaps the children a sandbox's
// init inherits, as Kubernetes' pause does.
func pause() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
