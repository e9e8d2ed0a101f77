"""``python -m e2e.cluster up|down|status``: the local cluster for newcomers, demos and CI."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from e2e.cluster.control import AlreadyRunning, ClusterError, default_state_dir, down, status, up, usage_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster", description=__doc__)
    parser.add_argument(
        "--dir", type=Path, default=None,
        help=f"state directory (default $RELAUNCH_CLUSTER_DIR or {default_state_dir()})",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    up_parser = sub.add_parser("up", help="start etcd, the control plane and the node agent")
    up_parser.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    up_parser.add_argument("--bin", type=Path, default=None, help="binaries directory (default: build.sh's)")
    up_parser.add_argument(
        "--kueue", action="store_true",
        help="also start Kueue (built by build-kueue.sh), configured for TrainingJobs (e2e/cluster/kueue.py)",
    )  # fmt: skip
    up_parser.add_argument(
        "--real-node", action="store_true",
        help="also join a real kubelet node on containerd with the project's image (e2e/cluster/realnode.py; "
        "only inside the network namespace of scripts/netns.sh)",
    )  # fmt: skip
    sub.add_parser("down", help="stop every process of the cluster")
    sub.add_parser("status", help="print the cluster's processes, ports and nodes as JSON")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            start = time.monotonic()
            try:
                cluster = up(args.dir, nodes=args.nodes, bin_dir=args.bin)
                if args.kueue:
                    from e2e.cluster import kueue
                    from relaunch.controller.kube import Kube

                    client = cluster.api_client()
                    kueue.start(cluster, Kube(client))
                    client.close()
                if args.real_node:
                    from e2e.cluster import realnode
                    from relaunch.controller.kube import Kube

                    client = cluster.api_client()
                    realnode.start(cluster, Kube(client), images=(realnode.PROJECT_IMAGE,))
                    client.close()
            except AlreadyRunning:
                raise
            except BaseException:
                down(args.dir, quiet=True)  # never leave half a cluster behind
                raise
            print(f"cluster up in {time.monotonic() - start:.1f} s\n{usage_text(cluster)}")
            return 0
        if args.command == "down":
            problems = down(args.dir)
            for problem in problems:
                print(problem, file=sys.stderr)
            return 1 if problems else 0
        print(json.dumps(status(args.dir), indent=2))
        return 0
    except (ClusterError, AssertionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
