# The sandbox-device-plugin operand image: one static binary on an empty base.
# Built by `make images`; `make images-local` builds the same image without
# a Docker engine (test/e2e/cmd/imagebuild), and a test checks they agree.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=devel
RUN mkdir -p /out/usr/bin /out/etc/ssl/certs && \
    cp /etc/ssl/certs/ca-certificates.crt /out/etc/ssl/certs/ && \
    CGO_ENABLED=0 GOWORK=off go build -trimpath \
      -ldflags "-s -w -X github.com/gpu-sandbox/gpu-sandbox/internal/version.Version=${VERSION}" \
      -o /out/usr/bin/sandbox-device-plugin ./cmd/sandbox-device-plugin

FROM scratch
COPY --from=build /out/ /
# The agent needs root on the node: sysfs writes, the kubelet's and
# containerd's directories, modprobe through the host root.
USER 0:0
ENTRYPOINT ["/usr/bin/sandbox-device-plugin"]
