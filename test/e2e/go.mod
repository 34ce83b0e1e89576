module github.com/gpu-sandbox/gpu-sandbox/test/e2e

go 1.26.8

require github.com/gpu-sandbox/gpu-sandbox v0.0.0

require golang.org/x/sys v0.50.0 // indirect

replace github.com/gpu-sandbox/gpu-sandbox => ../..
