package deviceplugin_test

import (
	"context"
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/deviceplugin"
)

// envAllocator gives a container the IDs of its devices in a variable.
type envAllocator struct{}

func (envAllocator) Allocate(_ context.Context, ids []string) (*pluginapi.ContainerAllocateResponse, error) {
	return &pluginapi.ContainerAllocateResponse{Envs: map[string]string{"THINGS": strings.Join(ids, ",")}}, nil
}

// Serving a resource and reading its device list the way the kubelet does.
// Without a kubelet.sock in the directory the server waits for one.
func Example() {
	dir, _ := os.MkdirTemp("", "plugins")
	defer os.RemoveAll(dir)

	s := deviceplugin.New("example.com/thing", envAllocator{}, deviceplugin.WithDir(dir))
	s.SetDevices([]deviceplugin.Device{{ID: "thing-0", Healthy: true, NUMANodes: []int{0}}, {ID: "thing-1"}})
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	done := make(chan error)
	go func() { done <- s.Run(ctx) }()

	conn, _ := grpc.NewClient("unix://"+s.SocketPath(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	defer conn.Close()
	stream, err := pluginapi.NewDevicePluginClient(conn).ListAndWatch(ctx, &pluginapi.Empty{},
		grpc.WaitForReady(true)) // the socket appears once Run has started
	if err != nil {
		fmt.Println(err)
		return
	}
	list, _ := stream.Recv()
	for _, d := range list.Devices {
		fmt.Println(d.ID, d.Health)
	}
	stop()
	fmt.Println(<-done)
	// Output:
	// thing-0 Healthy
	// thing-1 Unhealthy
	// <nil>
}
