# gpu-sandbox: node agents for GPU workloads in Kata Containers.
# `make help` lists the targets.

SHELL       := /usr/bin/env bash
COMMANDS    := vfio-manager sandbox-device-plugin kata-manager
VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)
PKG         := github.com/gpu-sandbox/gpu-sandbox
LDFLAGS     := -s -w -X $(PKG)/internal/version.Version=$(VERSION)
GO          ?= go
GOFLAGS_BIN := -trimpath -ldflags '$(LDFLAGS)'

# Every package of both modules of the workspace.
PACKAGES    := ./... ./test/e2e/...

.PHONY: all build test unit e2e e2e-kernel e2e-vm e2e-vm-nested e2e-cluster fuzz bench lint demo images images-local clean help

all: build

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

build: $(patsubst cmd/%,bin/%,$(wildcard $(COMMANDS:%=cmd/%))) ## build the agents into bin/ (static, versioned)

bin/%: FORCE
	CGO_ENABLED=0 $(GO) build $(GOFLAGS_BIN) -o $@ ./cmd/$*
	@if [ "$*" = vfio-manager ]; then ln -sf vfio-manager bin/vfio-manage; fi

FORCE:

test: ## run every test: unit, fake-node and real-component end-to-end tests
	hack/install-test-deps.sh
	$(GO) test -race -count=1 $(PACKAGES)

unit: ## run the library and agent tests only (no outside programs)
	$(GO) test -race -count=1 ./...

e2e: ## run the end-to-end tests only
	hack/install-test-deps.sh
	$(GO) test -count=1 ./test/e2e/...

e2e-kernel: ## run vfio-manager and discovery against a real kernel under QEMU
	hack/install-test-deps.sh
	$(GO) test -count=1 -run 'TestRealKernel' -v ./test/e2e/

e2e-vm: ## run the data path in a TCG guest: Allocate's and the CDI spec's device nodes driven by a VFIO user (in make test)
	hack/install-test-deps.sh
	$(GO) test -count=1 -run '^TestVMDataPath$$' -v ./test/e2e/

# Not in make test: minutes where the first guest cannot run KVM.
e2e-vm-nested: ## run cold plug as Kata does it: QEMU in a TCG guest gives the device to a second guest
	hack/install-test-deps.sh
	$(GO) test -tags nested -count=1 -run '^TestVMNested$$' -timeout 20m -v ./test/e2e/

e2e-cluster: images-local ## run the manifests, images and agents on a real single-node Kubernetes (root; first run builds it, ~10 min)
	hack/install-test-deps.sh
	hack/fetch-kubernetes.sh
	GPU_SANDBOX_E2E_IMAGES=.cache/images $(GO) test -tags cluster -count=1 -run '^TestCluster$$' -v -timeout 30m ./test/e2e/

FUZZTIME ?= 10s
FUZZ_TARGETS := FuzzParseConfig:./internal/katamanager FuzzModelName:./pkg/vfio \
	FuzzParseReference:./pkg/artifacts FuzzApplyRevert:./pkg/containerd FuzzRewrite:./pkg/kata \
	FuzzDeviceAttributes:./pkg/vfio FuzzSpec:./pkg/cdi

fuzz: ## run every fuzz target for FUZZTIME each (seed corpora in testdata/fuzz run in make test too)
	for t in $(FUZZ_TARGETS); do \
		$(GO) test -run '^$$' -fuzz "^$${t%%:*}$$" -fuzztime $(FUZZTIME) $${t#*:} || exit 1; \
	done

bench: ## measure the agents beside their references and write BENCHMARKS.md (under 10 minutes)
	hack/install-test-deps.sh
	$(GO) run ./test/e2e/cmd/bench --out BENCHMARKS.md

# The cluster and nested-VM tests' files carry build tags: lint them too.
lint: ## go vet, gofmt and staticcheck
	$(GO) vet -tags cluster,nested $(PACKAGES)
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt: $$out"; exit 1; fi
	hack/tool.sh staticcheck -tags cluster,nested $(PACKAGES)

demo: ## run the main job on a simulated node and show what a user would see
	$(GO) run ./test/e2e/cmd/demo

REGISTRY ?= ghcr.io/gpu-sandbox
IMAGE_TAG ?= $(VERSION)

images: ## build the three operand images with docker (REGISTRY, IMAGE_TAG)
	for a in $(COMMANDS); do \
		docker build -f deployments/container/$$a.Dockerfile --build-arg VERSION=$(VERSION) \
			-t $(REGISTRY)/$$a:$(IMAGE_TAG) . || exit 1; \
	done

images-local: build ## build the same images without a Docker engine into .cache/images (an OCI layout)
	rm -rf .cache/images
	$(GO) run ./test/e2e/cmd/imagebuild --bin bin --version $(IMAGE_TAG) --oci-layout .cache/images

clean: ## remove build outputs
	rm -rf bin
