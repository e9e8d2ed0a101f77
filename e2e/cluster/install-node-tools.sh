#!/usr/bin/env bash
# Installs what the testbed's real node runs on besides the kubelet build.sh makes: containerd
# (with its runc shim and `ctr`), runc, and the standard CNI plugins (bridge, host-local,
# loopback), from Debian's packages, when any is missing. Needs root; does nothing when all are there.
set -euo pipefail

missing=()
for tool in containerd ctr containerd-shim-runc-v2 runc; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
cni=""
for dir in /usr/lib/cni /opt/cni/bin; do
  if [ -x "$dir/bridge" ] && [ -x "$dir/host-local" ] && [ -x "$dir/loopback" ]; then cni=$dir; fi
done
[ -n "$cni" ] || missing+=("CNI plugins")
if [ ${#missing[@]} -eq 0 ]; then
  echo "[node-tools] containerd, runc and the CNI plugins ($cni) are installed" >&2
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "[node-tools] missing ${missing[*]}: apt-get install containerd runc containernetworking-plugins (as root)" >&2
  exit 1
fi
echo "[node-tools] installing ${missing[*]} from Debian's packages" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq containerd runc containernetworking-plugins >/dev/null
