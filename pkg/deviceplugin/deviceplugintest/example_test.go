package deviceplugintest_test

import (
	"context"
	"fmt"
	"os"
	"testing"

	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"

	"github.com/gpu-sandbox/gpu-sandbox/pkg/deviceplugin"
	"github.com/gpu-sandbox/gpu-sandbox/pkg/deviceplugin/deviceplugintest"
)

type none struct{}

func (none) Allocate(context.Context, []string) (*pluginapi.ContainerAllocateResponse, error) {
	return &pluginapi.ContainerAllocateResponse{}, nil
}

// harness is the part of testing.T the stand-in needs, for an example.
type harness struct{ testing.TB }

func (harness) Helper()                   {}
func (harness) Cleanup(func())            {}
func (harness) Fatal(a ...any)            { panic(fmt.Sprint(a...)) }
func (harness) Fatalf(f string, a ...any) { panic(fmt.Sprintf(f, a...)) }

// A plugin registers with the stand-in, which follows its device list as
// the kubelet does.
func Example() {
	dir, _ := os.MkdirTemp("", "dp")
	defer os.RemoveAll(dir)
	k := deviceplugintest.Start(harness{}, dir)
	defer k.Stop()

	s := deviceplugin.New("example.com/thing", none{}, deviceplugin.WithDir(dir))
	s.SetDevices([]deviceplugin.Device{{ID: "a", Healthy: true}})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- s.Run(ctx) }()

	p := k.WaitForDevices("example.com/thing", func(l []*pluginapi.Device) bool { return len(l) == 1 })
	fmt.Println(p.Resource, deviceplugintest.Health(p.Devices(), "a"))
	cancel()
	<-done
	// Output:
	// example.com/thing Healthy
}
