# The sandbox-device-plugin operand image: one static binary, the names the GPU
# Operator calls it by, and a static busybox shell with the few tools the
# operator's commands, probes and hooks run (/bin/sh -c ..., test, sleep).
# Built by `make images`; `make images-local` builds the same image without
# a Docker engine (test/e2e/cmd/imagebuild), and a test checks they agree.
FROM debian:bookworm-slim AS busybox
RUN apt-get update && apt-get install -y --no-install-recommends busybox-static

FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=devel
COPY --from=busybox /bin/busybox /out/bin/busybox
RUN mkdir -p /out/usr/bin /out/etc/ssl/certs && \
    cp /etc/ssl/certs/ca-certificates.crt /out/etc/ssl/certs/ && \
    for a in sh cat sleep test [ echo ls readlink basename dirname chroot grep awk env mkdir rm true false getopt head tr printf; do \
      ln -s busybox /out/bin/$a; done && \
    printf '#!/bin/sh\nexec /bin/sh "$@"\n' > /out/bin/bash && chmod 755 /out/bin/bash && \
    CGO_ENABLED=0 GOWORK=off go build -trimpath \
      -ldflags "-s -w -X github.com/gpu-sandbox/gpu-sandbox/internal/version.Version=${VERSION}" \
      -o /out/usr/bin/sandbox-device-plugin ./cmd/sandbox-device-plugin

FROM scratch
COPY --from=build /out/ /
ENV PATH=/usr/bin:/bin
# The agent needs root on the node: sysfs writes, the kubelet's and
# containerd's directories, modprobe through the host root.
USER 0:0
ENTRYPOINT ["/usr/bin/sandbox-device-plugin"]
