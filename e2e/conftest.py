"""pytest fixtures for tests on the local cluster (see e2e/cluster and e2e/nodeagent/).

* ``cluster`` (session): starts a cluster in ``.e2e-logs/cluster`` (or ``$RELAUNCH_TEST_CLUSTER_DIR``)
  and always stops it; with ``RELAUNCH_TEST_KUBECONFIG`` set, uses that running cluster instead
  (its node-agent controls are found through the ``state.json`` next to the kubeconfig).
* ``kube``: a ``kubernetes.client.ApiClient`` for the admin (``O=system:masters``).
* ``namespace``: a fresh namespace per test (its default ServiceAccount exists), deleted after.
* ``node_agent``: ``kill_pod(ns, name)``, ``lose_node(name)``, ``restore_node(name)``,
  ``pause_pod(ns, name)``/``resume_pod(ns, name)``, ``hold_pods(ns, selector)``/
  ``release_pods(ns, selector)``, ``pod_log(ns, name, container=None)``, ``status()``; after each
  test lost nodes are restored, holds released and paused pods resumed.
* ``e2e.cluster.control.evict_pod(kube, ns, name)``: the real Eviction API (not the agent).
* ``image`` (session, opt-in): the operator's image built by scripts/image.sh (its ID).
* ``real_node`` (session, opt-in): a real kubelet node, ``real-0``, joined to the cluster with the
  project's image (e2e/cluster/realnode.py); needs the network namespace of scripts/netns.sh.
* ``wait_for(predicate, timeout, describe)``: polls until truthy, fails with a readable message.
* ``kueue`` (session, opt-in): Kueue (built from its Go module, see e2e/cluster/kueue.py) running
  next to the control plane, its CRDs and webhooks installed; started the first time a test asks
  for it, so tests that do not queue jobs never pay for it.

When a test fails, the tails of the component logs and of the test namespace's pod logs are
added to its report.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.cluster import AgentControl, Cluster, ClusterError, down, up, wait_for
from e2e.cluster.control import REPO_ROOT, owned_by_another_process

TEST_CLUSTER_DIR = REPO_ROOT / ".e2e-logs" / "cluster"
IMAGE_SH = REPO_ROOT / "scripts" / "image.sh"
_SESSION: dict[str, Any] = {}  # the cluster in use, for the failure report hook
_NAMESPACE_KEY = pytest.StashKey[str]()  # each test's namespace, for the failure report hook


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    kubeconfig = os.environ.get("RELAUNCH_TEST_KUBECONFIG")
    if kubeconfig:
        path = Path(kubeconfig).resolve()
        found = Cluster.load(path.parent) or Cluster(state_dir=path.parent, kubeconfig=path)
        found.kubeconfig = path
        _SESSION["cluster"] = found
        yield found
        return
    state_dir = Path(os.environ.get("RELAUNCH_TEST_CLUSTER_DIR") or TEST_CLUSTER_DIR).resolve()
    owner = owned_by_another_process(state_dir)
    if owner is not None:
        pytest.exit(
            f"the test cluster in {state_dir} belongs to a running test session (pid {owner}); "
            "wait for it, or give this session its own directory with RELAUNCH_TEST_CLUSTER_DIR=...",
            returncode=3,
        )
    down(state_dir, quiet=True)  # whatever an interrupted run left behind
    atexit.register(down, state_dir, True)  # also on Ctrl-C or a crash of the session
    try:
        started = up(state_dir, nodes=3, owner_pid=os.getpid())
    except BaseException:
        down(state_dir, quiet=True)
        raise
    _SESSION["cluster"] = started
    try:
        yield started
    finally:
        _SESSION.pop("cluster", None)
        problems = down(state_dir, quiet=True)
        assert not problems, f"cluster teardown left: {problems}"


@pytest.fixture(scope="session")
def kube(cluster: Cluster) -> Iterator[Any]:
    client = cluster.api_client()
    yield client
    client.close()


def _namespace_name(test_name: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    return f"{base or 't'}-{uuid.uuid4().hex[:5]}"


@pytest.fixture
def namespace(request: pytest.FixtureRequest, kube: Any) -> Iterator[str]:
    from kubernetes import client as k8s

    core = k8s.CoreV1Api(kube)
    name = _namespace_name(request.node.name.removeprefix("test_"))
    core.create_namespace({"metadata": {"name": name, "labels": {"relaunch.dev/e2e": "true"}}})
    request.node.stash[_NAMESPACE_KEY] = name
    # pods are refused until the service-account controller has made the default account
    wait_for(
        lambda: core.read_namespaced_service_account("default", name), 30, f"ServiceAccount {name}/default"
    )
    wait_for(
        lambda: core.read_namespaced_config_map("kube-root-ca.crt", name),
        30,
        f"ConfigMap {name}/kube-root-ca.crt",
    )
    yield name
    try:
        core.delete_namespace(name, propagation_policy="Background")
    except k8s.ApiException as error:
        if error.status != 404:
            raise


@pytest.fixture
def node_agent(cluster: Cluster) -> Iterator[AgentControl]:
    if cluster.agent_url is None:
        pytest.fail(
            f"no node agent recorded next to {cluster.kubeconfig} (state.json): node controls need a cluster "
            "started by `python -m e2e.cluster up`"
        )
    agent = cluster.agent()
    yield agent
    for node in agent.lost_nodes():  # never leak a powered-off node into the next test
        agent.restore_node(node)
    for hold in agent.holds():  # nor a hold, nor a stopped process
        agent.release_pods(hold["namespace"], hold["selector"])
    for namespace, name in agent.paused_pods():
        with contextlib.suppress(ClusterError):  # it may have ended meanwhile
            agent.resume_pod(namespace, name)


@pytest.fixture(scope="session")
def kueue(cluster: Cluster, kube: Any) -> Iterator[Any]:
    from e2e.cluster import kueue as kueue_cluster
    from e2e.cluster.control import stop_pids
    from relaunch.controller.kube import Kube

    started = kueue_cluster.start(cluster, Kube(kube))
    yield started
    stop_pids({"kueue": started.pid}, cluster.state_dir, 10.0)


@pytest.fixture(scope="session")
def image() -> str:
    """The ID of the image ``scripts/image.sh`` builds, as `make image` left it (cached: seconds; in
    the tests' network namespace there is no network, so a build that needs a download fails here,
    saying so)."""
    built = subprocess.run(["bash", str(IMAGE_SH)], capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, f"scripts/image.sh failed (run `make image` first):\n{built.stderr[-4000:]}"
    return built.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def real_node(cluster: Cluster, kube: Any, image: str) -> Iterator[Any]:
    from e2e.cluster import realnode
    from relaunch.controller.kube import Kube

    try:
        node = realnode.start(cluster, Kube(kube), images=(realnode.PROJECT_IMAGE,))
    except realnode.RealNodeUnavailable as error:
        pytest.fail(str(error))
    yield node
    problems = realnode.stop(cluster.state_dir)
    assert not problems, f"the real node's teardown left: {problems}"


@pytest.fixture(name="wait_for")
def wait_for_fixture() -> Callable[..., Any]:
    return wait_for


def _testbed_logs(cluster: Cluster, namespace: str | None) -> str:
    parts = []
    optional = ("kueue", "kubelet", "containerd")  # started only when a test asked for them
    for component in ("node-agent", "kube-controller-manager", "kube-scheduler", "kube-apiserver", *optional):
        if component not in cluster.pids and component in optional:
            continue
        parts.append(f"--- {component} (tail) ---\n{cluster.log_tail(component, 30)}")
    if namespace:
        root = cluster.state_dir / "pods" / namespace
        for log in sorted(root.glob("*/*/*.log")) if root.is_dir() else []:
            pod, container = log.parent.parent.name, log.stem
            text = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            parts.append(f"--- pod {namespace}/{pod} container {container} (tail) ---\n{text}")
    return "\n".join(parts)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    cluster = _SESSION.get("cluster")
    if report.failed and report.when in ("setup", "call") and cluster is not None:
        report.sections.append(("testbed logs", _testbed_logs(cluster, item.stash.get(_NAMESPACE_KEY, None))))
