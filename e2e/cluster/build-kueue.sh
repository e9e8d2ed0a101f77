#!/usr/bin/env bash
# Builds Kueue's manager (sigs.k8s.io/kueue/cmd/kueue) from the Go module proxy at a pinned version,
# once, into ${RELAUNCH_CACHE:-~/.cache/relaunch}/bin/kueue-<version>/kueue, for the end-to-end tests
# that queue TrainingJobs (e2e/cluster/kueue.py). Kueue's go.mod has no replace directives, so a plain
# `go install module@version` builds it. A cached binary is reused; a cold build takes minutes.
# Prints two lines last: the directory holding the binary, then the module's source directory in Go's
# module cache (Kueue's CRDs and webhook manifests are read from there at test time, never copied).
set -euo pipefail

KUEUE_VERSION=v0.17.0
KUEUE_MODULE=sigs.k8s.io/kueue

cache=${RELAUNCH_CACHE:-$HOME/.cache/relaunch}
bin="$cache/bin/kueue-$KUEUE_VERSION"
mkdir -p "$bin"

log() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

exec 9>"$bin/.lock"
flock 9   # concurrent test sessions build it once
if [ -x "$bin/kueue" ]; then
  log "kueue: cached ($bin/kueue)"
else
  log "kueue: installing $KUEUE_MODULE/cmd/kueue@$KUEUE_VERSION (a cold build takes minutes)"
  start=$SECONDS
  rm -rf "$bin/.gobin"
  GOBIN="$bin/.gobin" CGO_ENABLED=0 GOFLAGS=-buildvcs=false go install -trimpath \
    -ldflags "-s -w -X $KUEUE_MODULE/pkg/version.GitVersion=$KUEUE_VERSION" \
    "$KUEUE_MODULE/cmd/kueue@$KUEUE_VERSION"
  mv -f "$bin/.gobin/kueue" "$bin/kueue"   # publish only a finished binary
  rmdir "$bin/.gobin" 2>/dev/null || true
  log "kueue: built in $((SECONDS - start)) s"
fi
exec 9>&-

# The module's files (config/components/...), from the module cache (downloaded if it was cleaned).
src=$(go mod download -json "$KUEUE_MODULE@$KUEUE_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
if [ -z "$src" ] || [ ! -d "$src/config/components/crd/bases" ]; then
  log "kueue: go mod download $KUEUE_MODULE@$KUEUE_VERSION gave no source directory with config/components"
  exit 1
fi
echo "$bin"
echo "$src"
