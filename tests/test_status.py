"""The status types (relaunch.controller.status) and the CRD's status schema are one truth: the
same fields at every level, with matching types."""

from __future__ import annotations

import types
import typing
from typing import Any, get_args, get_origin, get_type_hints

import pytest
import yaml
from test_crd import CRD_PATH, schema

from relaunch.controller import status as status_types

SCALARS = {int: "integer", str: "string", bool: "boolean", float: "number"}


def is_typeddict(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, dict) and hasattr(tp, "__total__")


def without_none(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        assert len(args) == 1, tp
        return args[0]
    return tp


def mismatches(tp: Any, node: dict[str, Any], where: str) -> list[str]:
    """Where the type and the schema node disagree (empty when they agree)."""
    tp = without_none(tp)
    kind = node.get("type")
    if is_typeddict(tp):
        if kind != "object":
            return [f"{where}: {tp.__name__} against a schema of type {kind}"]
        hints = get_type_hints(tp)
        declared = node.get("properties") or {}
        problems = [f"{where}.{k}: in the type, not in the CRD" for k in sorted(set(hints) - set(declared))]
        problems += [f"{where}.{k}: in the CRD, not in the type" for k in sorted(set(declared) - set(hints))]
        for key in sorted(set(hints) & set(declared)):
            problems += mismatches(hints[key], declared[key], f"{where}.{key}")
        return problems
    if get_origin(tp) is list:
        if kind != "array":
            return [f"{where}: a list against a schema of type {kind}"]
        return mismatches(get_args(tp)[0], node.get("items") or {}, f"{where}[]")
    if get_origin(tp) is dict:
        return [] if kind == "object" else [f"{where}: a dict against a schema of type {kind}"]
    expected = SCALARS.get(tp)
    return [] if expected == kind else [f"{where}: {tp} against a schema of type {kind}"]


def test_the_status_type_declares_exactly_the_crds_status_schema() -> None:
    crd = yaml.safe_load(CRD_PATH.read_text())
    node = schema(crd)["properties"]["status"]
    assert mismatches(status_types.JobStatus, node, "status") == []


@pytest.mark.parametrize(
    ("tp", "node", "expected"),
    [
        (
            status_types.NodeFailure,
            {"type": "object", "properties": {"node": {"type": "string"}}},
            "status.at",
        ),
        (int, {"type": "string"}, "against a schema of type string"),
        (list[str], {"type": "object"}, "a list against"),
    ],
)
def test_a_drift_is_reported(tp: Any, node: dict[str, Any], expected: str) -> None:
    assert any(expected in problem for problem in mismatches(tp, node, "status"))
