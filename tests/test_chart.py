"""The Helm chart: lint-clean, renders a safe single-replica operator, least-privilege RBAC in both
watch modes, a values schema that refuses bad values with a message naming the value, and a CRD
identical to the one source of truth in crds/.

Uses the helm binary that `make binaries` (e2e/cluster/build.sh) builds into the testbed cache;
no cluster is needed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "relaunch"
# The chart requires a recent cluster; `helm template` cannot ask one, so say which.
KUBE_VERSION = "v1.37.2"

#: Exactly what the operator may do in a namespace it serves (see templates/_helpers.tpl for why).
NAMESPACED_RULES = {
    ("relaunch.dev", "trainingjobs"): {"get", "list", "watch", "patch"},
    ("relaunch.dev", "trainingjobs/status"): {"patch"},
    ("", "pods"): {"get", "list", "watch", "create", "delete"},
    ("", "pods/log"): {"get"},
    ("", "services"): {"get", "create", "delete"},
    ("", "configmaps"): {"get", "list", "watch", "create", "delete"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
    ("", "events"): {"get", "create", "patch"},
    ("kueue.x-k8s.io", "workloads"): {"get", "list", "watch", "create", "patch", "delete"},
    ("kueue.x-k8s.io", "workloads/status"): {"patch"},
}
NODE_RULES = {("", "nodes"): {"list", "watch"}}
LEASE_RULES = {("coordination.k8s.io", "leases"): {"list", "watch"}}
LEADER_RULES = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}
#: Cluster-scoped, read when a queued job's Workload is created (its priority).
PRIORITY_RULES = {
    ("kueue.x-k8s.io", "workloadpriorityclasses"): {"get"},
    ("scheduling.k8s.io", "priorityclasses"): {"get"},
}


def helm_binary() -> str:
    """The testbed's helm: $RELAUNCH_HELM, else the cache folder build.sh fills, else PATH."""
    if os.environ.get("RELAUNCH_HELM"):
        return os.environ["RELAUNCH_HELM"]
    build = (ROOT / "e2e" / "cluster" / "build.sh").read_text()
    versions = dict(re.findall(r"^(K8S_VERSION|ETCD_VERSION|HELM_VERSION)=(\S+)$", build, re.M))
    cache = Path(os.environ.get("RELAUNCH_CACHE", Path.home() / ".cache" / "relaunch"))
    name = "testbed-k8s-{K8S_VERSION}-etcd-{ETCD_VERSION}-helm-{HELM_VERSION}".format(**versions)
    candidate = cache / "bin" / name / "helm"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("helm")
    if found is None:
        pytest.fail(f"helm not found at {candidate} nor on PATH: run `make binaries` first")
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
    return result


def render(*sets: str, namespace: str = "relaunch-system") -> list[dict[str, Any]]:
    flags = [f for s in sets for f in ("--set", s)]
    out = helm("template", "rl", str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION, *flags)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def rule_table(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    table: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                table.setdefault((group, resource), set()).update(rule["verbs"])
    return table


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = by_kind(docs, "Deployment")
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def assert_node_lease_role(docs: list[dict[str, Any]]) -> None:
    """Both modes: only lease listing, only in kube-node-lease (node heartbeats)."""
    (role,) = [r for r in by_kind(docs, "Role") if r["metadata"]["namespace"] == "kube-node-lease"]
    assert rule_table(role["rules"]) == LEASE_RULES
    (binding,) = [b for b in by_kind(docs, "RoleBinding") if b["metadata"]["namespace"] == "kube-node-lease"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"][0]["namespace"] == "relaunch-system"


def test_helm_lint_strict_passes() -> None:
    result = helm("lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART))
    assert "0 chart(s) failed" in result.stdout


def test_default_render_is_one_leader_elected_hardened_operator() -> None:
    docs = render()
    (deployment,) = by_kind(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    # The new pod of an upgrade waits as a standby until the old one releases the Lease.
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert {"--leader-election", "--leader-election-name=rl-relaunch-leader"} <= set(container(docs)["args"])
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["serviceAccountName"] == "rl-relaunch"
    main = container(docs)
    assert main["command"] == ["relaunch", "operator"]
    sc = main["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert set(main["resources"]) == {"requests", "limits"}
    assert set(main["resources"]["limits"]) == {"cpu", "memory"}
    assert main["image"] == "relaunch:0.1.0"  # the chart's appVersion


def test_leader_election_has_its_own_role_on_one_lease_namespace() -> None:
    docs = render("replicas=2")
    assert by_kind(docs, "Deployment")[0]["spec"]["replicas"] == 2
    (role,) = [r for r in by_kind(docs, "Role") if r["metadata"]["name"] == "rl-relaunch-leader"]
    assert role["metadata"]["namespace"] == "relaunch-system"
    assert rule_table(role["rules"]) == LEADER_RULES
    (binding,) = [b for b in by_kind(docs, "RoleBinding") if b["metadata"]["name"] == "rl-relaunch-leader"]
    assert binding["roleRef"]["name"] == "rl-relaunch-leader"
    assert binding["subjects"][0]["name"] == "rl-relaunch"


def test_without_leader_election_one_replica_is_recreated_never_overlapping() -> None:
    docs = render("leaderElection.enabled=false")
    spec = by_kind(docs, "Deployment")[0]["spec"]
    assert spec["strategy"] == {"type": "Recreate"} and spec["replicas"] == 1
    assert not [a for a in container(docs)["args"] if a.startswith("--leader-election")]
    assert not [r for r in by_kind(docs, "Role") if r["metadata"]["name"].endswith("-leader")]


def test_liveness_probe_calls_the_endpoint_the_operator_serves() -> None:
    main = container(render("health.port=18081"))
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert f"--liveness=http://0.0.0.0:{ports['health']}/healthz" in main["args"]
    assert ports["health"] == 18081
    probe = main["livenessProbe"]["httpGet"]
    assert probe == {"path": "/healthz", "port": "health"}


def test_metrics_service_targets_the_metrics_port_and_service_monitor_is_optional() -> None:
    docs = render("metrics.port=19090", "metrics.service.port=8443")
    main = container(docs)
    assert "--metrics-port=19090" in main["args"]
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8443, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == by_kind(docs, "Deployment")[0]["spec"]["selector"]["matchLabels"]
    assert by_kind(docs, "ServiceMonitor") == []

    (monitor,) = by_kind(render("metrics.serviceMonitor.enabled=true"), "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_cluster_mode_grants_exactly_the_operator_rules_cluster_wide() -> None:
    docs = render()
    assert_node_lease_role(docs)
    (role,) = by_kind(docs, "ClusterRole")
    assert rule_table(role["rules"]) == NAMESPACED_RULES | NODE_RULES | PRIORITY_RULES
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "rl-relaunch", "namespace": "relaunch-system"}
    ]
    assert "--all-namespaces" in container(docs)["args"]


def test_namespaces_mode_grants_roles_per_namespace_and_only_nodes_cluster_wide() -> None:
    docs = render("watch.mode=namespaces", "watch.namespaces={team-a,team-b}")
    assert_node_lease_role(docs)
    roles = [r for r in by_kind(docs, "Role") if r["metadata"]["namespace"] in ("team-a", "team-b")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert rule_table(role["rules"]) == NAMESPACED_RULES
    bindings = [b for b in by_kind(docs, "RoleBinding") if b["metadata"]["namespace"] != "kube-node-lease"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["relaunch-system", "team-a", "team-b"]
    for binding in bindings:
        assert binding["subjects"][0]["namespace"] == "relaunch-system"
    (cluster_role,) = by_kind(docs, "ClusterRole")
    assert rule_table(cluster_role["rules"]) == NODE_RULES | PRIORITY_RULES
    args = container(docs)["args"]
    assert "--all-namespaces" not in args
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]


@pytest.mark.parametrize(
    "sets", [(), ("watch.mode=namespaces", "watch.namespaces={a}"), ("metrics.serviceMonitor.enabled=true",)]
)
def test_rbac_has_no_wildcards_and_never_touches_secrets(sets: tuple[str, ...]) -> None:
    for doc in render(*sets):
        for rule in doc.get("rules", []) if doc["kind"] in ("Role", "ClusterRole") else []:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key] and all("*" not in v for v in rule[key]), rule
            assert "secrets" not in rule["resources"]
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


def test_existing_service_account_is_used_and_none_is_created() -> None:
    docs = render("serviceAccount.create=false", "serviceAccount.name=ops-bot")
    assert by_kind(docs, "ServiceAccount") == []
    assert by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["serviceAccountName"] == "ops-bot"
    assert by_kind(docs, "ClusterRoleBinding")[0]["subjects"][0]["name"] == "ops-bot"


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (("watch.mode=everything",), "at '/watch/mode': value must be one of 'cluster', 'namespaces'"),
        (("replicaCount=2",), "additional properties 'replicaCount' not allowed"),
        (("replicas=0",), "at '/replicas': minimum: got 0, want 1"),
        (
            ("replicas=2", "leaderElection.enabled=false"),
            "replicas is 2 but leaderElection.enabled is false",
        ),
        (("securityContext.runAsUser=0",), "at '/securityContext/runAsUser': minimum: got 0, want 1"),
        (
            ("watch.mode=namespaces", "watch.namespaces={Team_A}"),
            "at '/watch/namespaces/0': 'Team_A' does not match pattern",
        ),
        (("resources.limits.memory=lots",), "at '/resources/limits/memory'"),
        (("metrics.port=70000",), "at '/metrics/port': maximum: got 70,000, want 65,535"),
        (("image.pullPolicy=Sometimes",), "at '/image/pullPolicy': value must be one of"),
        (
            ("watch.mode=namespaces",),
            'watch.mode is "namespaces" but watch.namespaces is empty: list the namespaces',
        ),
        (
            ("watch.namespaces={team-a}",),
            'watch.mode is "cluster" (every namespace) but watch.namespaces lists team-a',
        ),
        (("serviceAccount.create=false",), "serviceAccount.create is false but serviceAccount.name is empty"),
        (
            ("metrics.serviceMonitor.enabled=true", "metrics.service.enabled=false"),
            "the ServiceMonitor scrapes that Service",
        ),
    ],
)
def test_bad_values_are_refused_with_a_message_naming_the_value(sets: tuple[str, ...], expected: str) -> None:
    flags = [f for s in sets for f in ("--set", s)]
    result = helm("template", "rl", str(CHART), "--kube-version", KUBE_VERSION, *flags, check=False)
    assert result.returncode != 0, f"helm accepted {sets}"
    assert expected in result.stderr, result.stderr


def test_every_template_renders_in_the_release_namespace_or_cluster_scope() -> None:
    docs = render("watch.mode=namespaces", "watch.namespaces={a,b}", "metrics.serviceMonitor.enabled=true")
    for doc in docs:
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            assert namespace is None
        elif doc["kind"] in ("Role", "RoleBinding"):
            assert namespace in ("a", "b", "kube-node-lease", "relaunch-system")
        else:
            assert namespace == "relaunch-system", doc["kind"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "rl"


def test_chart_crd_is_identical_to_the_source_of_truth() -> None:
    source = ROOT / "crds" / "trainingjob.yaml"
    copy = CHART / "crds" / "trainingjob.yaml"
    assert source.is_file(), f"{source} is missing"
    assert copy.is_file(), f"{copy} is missing: run scripts/sync-crd.sh"
    assert copy.read_bytes() == source.read_bytes(), (
        "charts/relaunch/crds/trainingjob.yaml differs from crds/trainingjob.yaml: run scripts/sync-crd.sh"
    )
    crd = yaml.safe_load(source.read_text())
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["spec"]["group"] == "relaunch.dev"
    assert crd["spec"]["names"]["kind"] == "TrainingJob"
    # The RBAC grants exactly what the CRD defines, under the same plural.
    assert crd["spec"]["names"]["plural"] == "trainingjobs"


def test_sync_script_copies_the_crd(tmp_path: Path) -> None:
    # A copy of the repository's relevant layout, so the real chart is never touched.
    (tmp_path / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "sync-crd.sh", tmp_path / "scripts")
    (tmp_path / "crds").mkdir()
    (tmp_path / "crds" / "trainingjob.yaml").write_text("kind: CustomResourceDefinition\n# v2\n")
    (tmp_path / "charts" / "relaunch" / "crds").mkdir(parents=True)
    (tmp_path / "charts" / "relaunch" / "crds" / "trainingjob.yaml").write_text("stale\n")
    subprocess.run(["bash", str(tmp_path / "scripts" / "sync-crd.sh")], check=True, capture_output=True)
    assert (tmp_path / "charts" / "relaunch" / "crds" / "trainingjob.yaml").read_text().endswith("# v2\n")


def resources_the_operator_calls() -> set[tuple[str, str]]:
    """(API group, resource) of every API path and kopf handler in the operator's code."""
    names = {
        "{GROUP}": "relaunch.dev",
        "{PLURAL}": "trainingjobs",
        "GROUP": "relaunch.dev",
        "PLURAL": "trainingjobs",
        "{kueue.GROUP}": "kueue.x-k8s.io",
        "kueue.GROUP": "kueue.x-k8s.io",
    }
    found: set[tuple[str, str]] = set()
    for source in sorted((ROOT / "operator" / "relaunch" / "controller").glob("*.py")):
        text = source.read_text()
        for path in re.findall(r"/apis?/[^\"'\s]+", text):
            parts = path.strip("/").split("/")
            group, rest = ("", parts[2:]) if parts[0] == "api" else (names.get(parts[1], parts[1]), parts[3:])
            if rest and rest[0] == "namespaces" and len(rest) > 2:
                rest = rest[2:]
            if rest:
                found.add((group, names.get(rest[0], rest[0])))
        if '+ "/status"' in text:
            found.add(("relaunch.dev", "trainingjobs/status"))
        if 'path += "/status"' in text and "Workload" in text:
            found.add(("kueue.x-k8s.io", "workloads/status"))
        if '+ "/log"' in text:
            found.add(("", "pods/log"))
        for args in re.findall(r"@kopf\.(?:on\.\w+|daemon|timer|index)\(([^)]*)\)", text):
            positional = [a.strip().strip("\"'") for a in args.split(",") if a.strip() and "=" not in a]
            if len(positional) == 1:
                found.add(("", names.get(positional[0], positional[0])))
            elif len(positional) == 3:
                found.add((names.get(positional[0], positional[0]), names.get(positional[2], positional[2])))
    return found


def test_rbac_covers_exactly_the_resources_the_operator_code_calls() -> None:
    # Verbs are proven on the testbed (e2e/test_chart.py recovers a job under this RBAC); this
    # catches a resource added to the operator but not to the chart, or granted but never used.
    called = resources_the_operator_calls()
    assert ("", "pods") in called and ("relaunch.dev", "trainingjobs") in called  # the scan works
    granted = set(NAMESPACED_RULES) | set(NODE_RULES) | set(LEASE_RULES) | set(PRIORITY_RULES)
    assert called == granted, (
        f"called but not granted: {called - granted}; granted but unused: {granted - called}"
    )
