#!/usr/bin/env bash
# Run a command inside a network namespace of its own (`make e2e` runs the end-to-end tests so):
#
#   scripts/netns.sh COMMAND [ARGS...]
#
# The namespace has only its loopback interface, which holds, besides 127.0.0.0/8, two addresses
# that exist nowhere else (on lo: this machine kind's kernel has no dummy interfaces):
#   198.18.0.2   the real node's address (a kubelet refuses a loopback node IP, and the tests may
#                reach no address of the machine itself: so it lives here, in a namespace they made)
#   10.96.0.1    the ClusterIP of the `kubernetes` Service, where pods on the real node find the
#                API server (e2e/cluster/realnode.py forwards it, as kube-proxy would)
# Only the network is separate (nsenter --net): the files, the cgroups and the processes are the
# machine's, so containerd, the kubelet and podman work as they do outside. Nothing in the
# namespace can reach the machine's other addresses or the internet: build what needs a download
# (`make binaries image`) before. The namespace is deleted when COMMAND ends; its exit status is
# this script's.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "netns.sh: making a network namespace needs root (ip netns add)" >&2
  exit 1
fi
ns=relaunch-e2e-$$
node_ip=198.18.0.2
service_ip=10.96.0.1

ip netns add "$ns"
cleanup() {
  local pids
  pids=$(ip netns pids "$ns" 2>/dev/null || true)
  [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
  ip netns delete "$ns" 2>/dev/null || true
}
trap cleanup EXIT
ip -n "$ns" link set lo up
ip -n "$ns" addr add "$node_ip/32" dev lo
ip -n "$ns" addr add "$service_ip/32" dev lo

status=0
RELAUNCH_NETNS=$ns RELAUNCH_NODE_IP=$node_ip RELAUNCH_SERVICE_IP=$service_ip \
  nsenter --net="/run/netns/$ns" -- "$@" || status=$?
exit "$status"
