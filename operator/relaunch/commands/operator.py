"""``relaunch operator``: run the TrainingJob controller (kopf) until interrupted.

Standalone by default (one replica; the chart deploys it with ``strategy: Recreate``). With
``--peering NAME`` several replicas coordinate through kopf's peering objects (which must then
be installed, and the RBAC must allow them) so that only one of them acts at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from relaunch.cli import UsageError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "operator",
        help="run the TrainingJob operator",
        description="Run the controller that keeps TrainingJobs alive (needs access to a cluster: "
        "in a pod its service account, elsewhere $KUBECONFIG).",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        metavar="NS",
        help="watch TrainingJobs in this namespace (repeatable); the default is all namespaces",
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (default)")
    parser.add_argument(
        "--metrics-port", type=int, default=8080, help="serve Prometheus metrics on this port (0: off)"
    )
    parser.add_argument(
        "--liveness",
        metavar="URL",
        default=None,
        help="serve a liveness probe, e.g. http://0.0.0.0:8081/healthz",
    )
    parser.add_argument(
        "--peering",
        metavar="NAME",
        default=None,
        help="coordinate with other replicas through this kopf peering object (default: standalone)",
    )
    parser.add_argument(
        "--node-poll-seconds",
        type=float,
        default=1.0,
        help="how often node health (Ready condition, Lease heartbeat) is read (default 1)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.metrics_port < 0 or args.metrics_port > 65535:
        raise UsageError(f"--metrics-port must be between 0 and 65535, got {args.metrics_port}")
    if args.node_poll_seconds <= 0:
        raise UsageError(f"--node-poll-seconds must be positive, got {args.node_poll_seconds}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kopf reports every successful handler call at INFO; with a watch on pods that drowns the
    # recovery steps (logged by relaunch.controller at INFO and posted as Events).
    if not args.verbose:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # Imported here: registering the handlers is a side effect meant for this command only.
    import kopf

    from relaunch.controller import handlers

    handlers.RUNTIME.metrics_port = args.metrics_port or None
    handlers.RUNTIME.node_poll_seconds = args.node_poll_seconds
    namespaces = list(args.namespace)
    try:
        asyncio.run(
            kopf.operator(
                standalone=args.peering is None,
                peering_name=args.peering,
                clusterwide=not namespaces,
                namespaces=namespaces,
                liveness_endpoint=args.liveness,
            )
        )
    except KeyboardInterrupt:
        return 130
    return 0
