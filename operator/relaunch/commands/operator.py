"""``relaunch operator``: run the TrainingJob controller (kopf) until interrupted.

Acts alone by default (one replica). With ``--leader-election`` several replicas share one
coordination.k8s.io Lease and only its holder acts (:mod:`relaunch.controller.leader`); the
chart runs it that way.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
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
        "--leader-election",
        action="store_true",
        help="act only while holding a coordination.k8s.io Lease, so that of several replicas "
        "exactly one acts and a standby takes over when it dies (default: act alone, run one replica)",
    )
    parser.add_argument(
        "--leader-election-namespace",
        metavar="NS",
        default=None,
        help="namespace of the Lease (default: $POD_NAMESPACE, else 'default')",
    )
    parser.add_argument(
        "--leader-election-name",
        metavar="NAME",
        default="relaunch-operator",
        help="name of the Lease (default relaunch-operator)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.metrics_port < 0 or args.metrics_port > 65535:
        raise UsageError(f"--metrics-port must be between 0 and 65535, got {args.metrics_port}")
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
    from relaunch.controller.leader import default_identity

    handlers.RUNTIME.metrics_port = args.metrics_port or None
    if args.leader_election:
        namespace = args.leader_election_namespace or os.environ.get("POD_NAMESPACE") or "default"
        handlers.RUNTIME.leader_lease = (namespace, args.leader_election_name)
    namespaces = list(args.namespace)
    try:
        asyncio.run(
            kopf.operator(
                # kopf's own peering would pause only kopf's handlers, not the job loops: one
                # active replica is leader election's job (--leader-election).
                standalone=True,
                clusterwide=not namespaces,
                namespaces=namespaces,
                liveness_endpoint=args.liveness,
                # kopf would name itself after the user from the password database, which has no
                # entry for the image's numeric user (65532, or any runAsUser): it would crash.
                identity=default_identity(),  # type: ignore[arg-type]  # kopf's NewType of str
            )
        )
    except KeyboardInterrupt:
        return 130
    return 0
