module github.com/gpu-sandbox/gpu-sandbox

go 1.26.8

require (
	github.com/NVIDIA/go-nvlib v0.13.0
	github.com/sirupsen/logrus v1.10.2
	github.com/spf13/pflag v1.1.0
	golang.org/x/sys v0.50.0
)
