"""The docs cannot rot: every YAML snippet in README.md and every sample in examples/*.yaml is sent
to the testbed's API server (server-side dry run, strict field validation, the TrainingJob CRD's
schema and CEL rules included), and every chart-values snippet is rendered by helm.

README convention, checked here: a ```yaml block holds Kubernetes objects (applied), or starts
with ``# values.yaml`` (chart values: rendered with `helm template -f`), or starts with
``# training config`` (a MindFormers YAML fragment: must parse). Anything else fails the test,
so no snippet is left unchecked.
"""

from __future__ import annotations

import re
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CRD = ROOT / "crds" / "trainingjob.yaml"

pytestmark = pytest.mark.e2e


def readme_blocks() -> list[tuple[int, str]]:
    """(line number, text) of each ```yaml block in README.md."""
    blocks = []
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```yaml":
            start = i + 1
            j = start
            while lines[j].strip() != "```":
                j += 1
            # a block inside a list item is indented with it
            blocks.append((start + 1, textwrap.dedent("\n".join(lines[start:j]) + "\n")))
            i = j
        i += 1
    return blocks


def kubectl(cluster: Any, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [cluster.kubectl(), f"--kubeconfig={cluster.kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def crd_installed(cluster: Any) -> None:
    """The TrainingJob CRD as the chart ships it (idempotent: other tests may have installed it)."""
    applied = kubectl(cluster, "apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    assert applied.returncode == 0, applied.stderr
    established = kubectl(
        cluster, "wait", "--for=condition=Established", "--timeout=30s", "crd/trainingjobs.relaunch.dev"
    )
    assert established.returncode == 0, established.stderr


def dry_run(cluster: Any, namespace: str, text: str) -> subprocess.CompletedProcess[str]:
    return kubectl(
        cluster, "apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", "-", stdin=text
    )


def test_readme_has_yaml_snippets() -> None:
    # Guards the collection below: a README reorganisation must not silently leave nothing tested.
    kinds = [
        doc.get("kind")
        for _, text in readme_blocks()
        for doc in yaml.safe_load_all(text)
        if isinstance(doc, dict)
    ]
    assert "TrainingJob" in kinds
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_accepted_by_the_api_server(
    cluster: Any, namespace: str, crd_installed: None, example: Path
) -> None:
    docs = [d for d in yaml.safe_load_all(example.read_text()) if d]
    assert any(d["kind"] == "TrainingJob" for d in docs), f"{example.name} holds no TrainingJob"
    result = dry_run(cluster, namespace, example.read_text())
    assert result.returncode == 0, f"{example.name} was refused:\n{result.stderr}"
    assert len(re.findall(r"\(server dry run\)", result.stdout)) == len(docs), result.stdout


def test_every_readme_snippet_is_checked(
    cluster: Any, namespace: str, crd_installed: None, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from tests.test_chart import CHART, KUBE_VERSION, helm

    if any("apiVersion: kueue.x-k8s.io/" in text for _, text in readme_blocks()):
        request.getfixturevalue("kueue")  # Kueue's objects are checked by Kueue's CRDs and webhooks
    failures = []
    for line, text in readme_blocks():
        first = text.lstrip().splitlines()[0] if text.strip() else ""
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as error:
            failures.append(f"README.md:{line}: not YAML: {error}")
            continue
        if first.startswith("# values.yaml"):
            path = tmp_path / f"readme-values-{line}.yaml"
            path.write_text(text)
            rendered = helm(
                "template", "rl", str(CHART), "--kube-version", KUBE_VERSION, "-f", str(path), check=False
            )
            if rendered.returncode != 0:
                failures.append(f"README.md:{line}: helm refused these values:\n{rendered.stderr}")
        elif first.startswith("# training config"):
            if not all(isinstance(d, dict) for d in docs):
                failures.append(f"README.md:{line}: a training config must be a YAML mapping")
        elif docs and all(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in docs):
            result = dry_run(cluster, namespace, text)
            if result.returncode != 0:
                failures.append(f"README.md:{line}: refused by the API server:\n{result.stderr}")
        else:
            failures.append(
                f"README.md:{line}: a yaml block must hold Kubernetes objects, or start with "
                "'# values.yaml' or '# training config'"
            )
    assert not failures, "\n".join(failures)


def test_a_broken_trainingjob_is_refused_with_the_field_named(
    cluster: Any, namespace: str, crd_installed: None
) -> None:
    # Guards the dry runs above: the server really validates (schema and CEL) what it is sent.
    sample = yaml.safe_load((ROOT / "examples" / "elastic.yaml").read_text())
    sample["spec"]["elastic"]["minReplicas"] = 16  # more than spec.replicas: a CEL rule
    result = dry_run(cluster, namespace, yaml.safe_dump(sample))
    assert result.returncode != 0
    assert "spec.elastic.minReplicas must be <= spec.replicas" in result.stderr, result.stderr

    sample = yaml.safe_load((ROOT / "examples" / "elastic.yaml").read_text())
    sample["spec"]["checkpoint"]["colour"] = "blue"  # not in the schema: strict field validation
    result = dry_run(cluster, namespace, yaml.safe_dump(sample))
    assert result.returncode != 0
    assert "colour" in result.stderr, result.stderr
