// Command emptygrpc serves gRPC with no service on a unix socket: the
// reference for an agent's idle memory in the benchmarks.
package main

import (
	"fmt"
	"net"
	"os"

	"google.golang.org/grpc"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: emptygrpc SOCKET")
		os.Exit(2)
	}
	lis, err := net.Listen("unix", os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println("ready")
	if err := grpc.NewServer().Serve(lis); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
