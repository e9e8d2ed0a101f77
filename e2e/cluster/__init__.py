"""The local Kubernetes testbed: real control-plane binaries on 127.0.0.1 plus a node agent that
runs pods as local processes. ``python -m e2e.cluster up|down|status``; see ``control`` for the
state directory's layout and ``e2e.nodeagent`` for how pods run."""

from e2e.cluster.control import (
    AgentControl,
    Cluster,
    ClusterError,
    default_state_dir,
    down,
    status,
    up,
    wait_for,
)

__all__ = ["AgentControl", "Cluster", "ClusterError", "default_state_dir", "down", "status", "up", "wait_for"]
