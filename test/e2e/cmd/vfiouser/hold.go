package main

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// bar0 is one device's BAR0 as the device fd exposes it.
type bar0 struct {
	d     *device
	first uint32
}

func (b *bar0) read() (uint32, error) { return b.d.readAt(b.d.bar0, 0, 4) }

func hold(args []string) error {
	n, err := classify(args)
	if err != nil {
		return err
	}
	if len(n.groups) != 1 {
		return errors.New("hold takes one group node")
	}
	if n.container == "" {
		n.container = "/dev/vfio/vfio"
	}
	c, err := openContainer(n.container)
	if err != nil {
		return err
	}
	g, err := c.attach(n.groups[0])
	if err != nil {
		return err
	}
	addresses := n.addresses
	if len(addresses) == 0 {
		if addresses, err = members(g.node); err != nil {
			return err
		}
	}
	var bars []*bar0
	for _, addr := range addresses {
		d, err := g.device(addr)
		if err != nil {
			return err
		}
		b := &bar0{d: d}
		if b.first, err = b.read(); err != nil {
			return err
		}
		fmt.Printf("%s BAR0[0]=%#08x\n", addr, b.first)
		bars = append(bars, b)
	}
	fmt.Printf("ready pid=%d\n", os.Getpid())

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			fmt.Println("released")
			return nil
		case <-tick.C:
		}
		for _, b := range bars {
			if v, err := b.read(); err != nil || v != b.first {
				fmt.Printf("lost %s: BAR0[0]=%#08x err=%v\n", b.d.address, v, err)
				os.Exit(3)
			}
		}
	}
}
