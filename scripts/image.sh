#!/usr/bin/env bash
# Build the operator image from the Dockerfile with podman (`make image`), or run podman with the
# same configuration:
#
#   scripts/image.sh [build]        build and tag localhost/relaunch:dev; stdout: the image's ID
#                                   (which a later build's retagging cannot change)
#   scripts/image.sh podman ARGS    podman ARGS, e.g. `podman run --rm IMAGE relaunch --help`
#
# Elsewhere `docker build -t relaunch .` is all it takes (README, "Install on a real cluster").
# Here, with no Docker engine and possibly no image registry, this script uses Debian's container
# stack (podman, buildah, runc: installed with apt-get when missing) and works around three limits
# of such hosts without touching /etc or the image:
#   - crun cannot start containers on a cgroup v1 "hybrid" host: runc is used instead;
#   - the default rlimits may be refused to root without CAP_SYS_RESOURCE: lower ones are set;
#   - pip inside the build must trust what the host trusts: the host's CA bundle is mounted over
#     the image's for the build only (the image keeps Debian's stock bundle).
# Both settings live in a containers.conf of our own (CONTAINERS_CONF). The network is the host's
# (no bridge, no iptables rules).
#
# The base is the Dockerfile's python:3.11 slim image when a registry gives it; otherwise a base
# made from Debian's packages with debootstrap (bookworm's Python 3.11 in /usr/bin; the Dockerfile
# takes it unchanged). Everything is kept under ~/.cache/relaunch/image (podman's storage too), so
# a rebuild with nothing changed takes seconds, and one after a change to the code alone reuses
# the dependencies' layer. Layers of earlier builds stay until `scripts/image.sh podman image
# prune` (then the next build starts from the base again).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${RELAUNCH_IMAGE_CACHE:-$HOME/.cache/relaunch/image}
TAG=${RELAUNCH_IMAGE:-localhost/relaunch:dev}
REGISTRY_BASE=docker.io/library/python:$(sed -n 's/^ARG PYTHON_IMAGE=python://p' Dockerfile)
DEBIAN_BASE=localhost/relaunch-pybase:bookworm
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

log() { echo "image: $*" >&2; }

install_tools() {
  local missing=()
  for tool in podman buildah runc debootstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] && return
  if [ "$(id -u)" != 0 ]; then
    log "needs ${missing[*]}: apt-get install -y podman buildah runc debootstrap (as root)"
    exit 1
  fi
  log "installing ${missing[*]} from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc debootstrap >/dev/null
}

configure() {
  # Run-time state (locks, mounts) in /run, one folder per cache, never shared with another
  # storage: podman's own defaults, or another cache's, stay untouched.
  local run
  run=/run/relaunch-image/$(printf '%s' "$CACHE" | sha256sum | cut -c1-12)
  mkdir -p "$CACHE/storage" "$run"
  cat >"$CACHE/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
tmp_dir = "$run/libpod"
EOF
  cat >"$CACHE/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$CACHE/storage"
runroot = "$run/storage"
EOF
  export CONTAINERS_CONF=$CACHE/containers.conf
  export CONTAINERS_STORAGE_CONF=$CACHE/storage.conf
}

debian_mirror() {
  local mirror
  mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list 2>/dev/null)
  echo "${mirror:-http://deb.debian.org/debian}"
}

debian_base() {
  if podman image exists "$DEBIAN_BASE"; then
    return
  fi
  local rootfs
  rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  log "making $DEBIAN_BASE with debootstrap from $(debian_mirror) (once; about a minute)"
  mkdir -p "$CACHE/debs"
  debootstrap --variant=minbase --cache-dir="$CACHE/debs" \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$(debian_mirror)" >"$CACHE/debootstrap.log" 2>&1 ||
    { tail -20 "$CACHE/debootstrap.log" >&2; rm -rf "$rootfs"; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
  tar -C "$rootfs" -c . | podman import --quiet - "$DEBIAN_BASE" >/dev/null
  rm -rf "$rootfs"
}

base_image() {
  if [ -n "${RELAUNCH_BASE_IMAGE:-}" ]; then
    echo "$RELAUNCH_BASE_IMAGE"
  elif podman image exists "$REGISTRY_BASE" ||
    timeout 60 podman pull --quiet "$REGISTRY_BASE" >/dev/null 2>&1; then
    echo "$REGISTRY_BASE"
  else
    log "$REGISTRY_BASE cannot be pulled here: using a base made from Debian's packages"
    debian_base
    echo "$DEBIAN_BASE"
  fi
}

build() {
  local base started
  base=$(base_image)
  started=$(date +%s)
  log "building $TAG on $base"
  local id
  id=$(podman build --quiet --layers --network host \
    --volume "$CA_BUNDLE:$CA_BUNDLE:ro" \
    --build-arg "PYTHON_IMAGE=$base" \
    --tag "$TAG" --file Dockerfile .)
  log "built $TAG in $(($(date +%s) - started)) s, $(podman image inspect --format '{{.Size}}' "$id") bytes"
  echo "$id"
}

install_tools
configure
case "${1:-build}" in
  build) build ;;
  podman) shift; exec podman "$@" ;;
  *) log "usage: $0 [build | podman ARGS...]"; exit 2 ;;
esac
