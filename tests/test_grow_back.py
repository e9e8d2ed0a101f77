"""Elastic grow-back through the pure state machine: after a shrink, the job restarts at a larger
allowed size once more nodes have been Ready for spec.elastic.growBackAfterSeconds."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from test_reconcile import T0, Sim, make_spec, plan

from relaunch.controller.planning import _PLAN_REASON
from relaunch.controller.reconcile import CONTROLLED_REASONS, NodeView, ProgressView
from relaunch.model import DEFAULT_GROW_BACK_AFTER_SECONDS, SpecError, parse_spec

WINDOW = 60
GRACE = 10
NODES = ("n1", "n2", "n3", "n4")
CONVERT = plan("convert", step=5, epoch=1, ranks=4, convert_command=["relaunch", "convert"])


def ready_node(name: str, since: float) -> NodeView:
    return NodeView(name, True, None, since, ready_since=since)


def place(sim: Sim, attempt: int, nodes: tuple[str, ...]) -> None:
    """The attempt's workers run, worker i on nodes[i]; the others stay unschedulable."""
    for name, pod in sim.pods.items():
        if pod.attempt != attempt or pod.deleting:
            continue
        if pod.index < len(nodes):
            sim.pods[name] = dataclasses.replace(pod, phase="Running", node=nodes[pod.index])
        elif pod.unschedulable_since is None:
            sim.pods[name] = dataclasses.replace(pod, unschedulable_since=sim.now)


def lose(sim: Sim, node: str) -> None:
    sim.nodes[node] = NodeView(node, False, sim.now, sim.now)
    sim.frozen.add(node)


def restore(sim: Sim, node: str) -> None:
    sim.nodes[node] = ready_node(node, sim.now)
    sim.frozen.discard(node)


def finish_resize(sim: Sim, nodes: tuple[str, ...], dt: float = 0.1) -> None:
    """Drive the current recovery (a resize that converts) until its workers are placed on
    ``nodes``, then look again ``dt`` seconds later."""
    attempt = sim.status["recovery"]["attempt"]
    sim.finish_deletions()
    sim.step()
    sim.finish_job(f"demo-plan-{attempt}", CONVERT)
    sim.step()
    sim.finish_job(f"demo-convert-{attempt}", "{}")
    sim.step()
    place(sim, attempt, nodes)
    sim.step(dt=dt)


def shrunk(elastic: dict[str, Any] | None = None, **spec: Any) -> Sim:
    """A 4-worker elastic job (one worker per node) that lost n3 and n4 and shrank to 2."""
    sim = Sim(
        make_spec(
            replicas=4,
            elastic={"minReplicas": 2, "growBackAfterSeconds": WINDOW, **(elastic or {})},
            recovery={"nodeLossGraceSeconds": GRACE, "backoff": {"initialSeconds": 0}},
            **spec,
        )
    )
    sim.nodes = {n: ready_node(n, T0 - 3600) for n in NODES}
    sim.step()
    sim.finish_job("demo-plan-1", plan("fresh"))
    sim.step()
    place(sim, 1, NODES)
    sim.step()
    assert sim.status["phase"] == "Running", sim.status
    lose(sim, "n3")
    lose(sim, "n4")
    sim.fail_pod("demo-1-2")
    sim.step()
    sim.finish_deletions()
    sim.step()
    sim.finish_job("demo-plan-2", plan("resume", step=5, epoch=1, ranks=4))
    sim.step()
    place(sim, 2, ("n1", "n2"))
    sim.step(dt=GRACE + 1)
    rec = sim.status["recovery"]
    assert (rec["reason"], rec["replicas"]) == ("Shrink", 2), rec
    finish_resize(sim, ("n1", "n2"))
    assert sim.status["phase"] == "Running" and sim.status["workers"] == 2, sim.status
    assert sim.status["lastResize"]["schedulableNodes"] == 2
    return sim


def recovery_reasons(sim: Sim) -> list[str]:
    return [e["reason"] for e in sim.status.get("recoveries") or []]


# ----------------------------------------------------------------------------------------------


def test_the_window_defaults_and_is_validated() -> None:
    spec = parse_spec(make_spec(replicas=4, elastic={"minReplicas": 2}))
    assert spec.elastic is not None
    assert spec.elastic.grow_back_after_seconds == DEFAULT_GROW_BACK_AFTER_SECONDS == 300
    with pytest.raises(SpecError, match=r"spec\.elastic\.growBackAfterSeconds must be >= 0"):
        parse_spec(make_spec(replicas=4, elastic={"minReplicas": 2, "growBackAfterSeconds": -1}))


def test_grow_back_after_the_window_is_a_controlled_resize_that_converts() -> None:
    sim = shrunk()
    restarts = sim.status["restarts"]
    restore(sim, "n3")
    restore(sim, "n4")
    back = sim.now
    result = sim.step(dt=WINDOW - 5)
    assert "recovery" not in sim.status  # the nodes have not been Ready for the whole window
    assert result.requeue_after <= 5 + 0.01  # woken when they have
    sim.step(dt=6)
    rec = sim.status["recovery"]
    assert (rec["reason"], rec["replicas"], rec["counted"], rec["fromWorldSize"]) == ("GrowBack", 4, False, 2)
    assert "growing from 2 to 4 workers" in rec["message"]
    assert sim.status["restarts"] == restarts  # not a failure
    assert sim.status["lastResize"]["reason"] == "GrowBack" and sim.now - back > WINDOW
    assert "GrowBack" in CONTROLLED_REASONS and _PLAN_REASON["GrowBack"] == "Resize"
    finish_resize(sim, NODES)
    assert sim.planner.commands[-1]["reason"] == "GrowBack"
    assert sim.planner.commands[-1]["world_size"] == 4
    assert sim.planner.commands[-1]["previous_world_size"] == 2
    assert any(m["metadata"]["name"] == "demo-convert-4" for m in sim.created)
    assert sim.status["phase"] == "Running" and sim.status["workers"] == 4
    entry = sim.status["recoveries"][-1]
    assert (entry["reason"], entry["converted"], entry["counted"]) == ("GrowBack", True, False)
    assert sim.status["restarts"] == restarts
    sim.step(dt=WINDOW * 2)  # at full size: nothing more to do
    assert "recovery" not in sim.status


def test_a_node_that_flaps_inside_the_window_causes_no_grow_back() -> None:
    sim = shrunk()
    restore(sim, "n3")
    restore(sim, "n4")
    sim.step(dt=WINDOW / 2)
    lose(sim, "n4")
    sim.step(dt=3)
    restore(sim, "n4")  # back again: its window starts over
    flapped_back = sim.now
    sim.step(dt=WINDOW / 2)
    assert "recovery" not in sim.status  # n3 alone has been Ready for the window
    sim.step(dt=WINDOW / 2 - 4)
    assert "recovery" not in sim.status and sim.now < flapped_back + WINDOW
    sim.step(dt=5)
    assert sim.status["recovery"]["reason"] == "GrowBack"
    assert sim.status["recovery"]["replicas"] == 4


def grown_then_shrunk() -> tuple[Sim, float]:
    """A grow-back to 4 whose fourth worker cannot be placed (n4 is Ready but full): the elastic
    shrink brings the job back to 3. Returns the simulation and when the shrink started."""
    sim = shrunk()
    sim.planner.factorable = lambda world_size, config_text: True  # type: ignore[method-assign]
    restore(sim, "n3")
    restore(sim, "n4")
    sim.step(dt=WINDOW + 1)
    assert sim.status["recovery"]["reason"] == "GrowBack"
    finish_resize(sim, ("n1", "n2", "n3"), dt=GRACE + 1)
    assert (sim.status["recovery"]["reason"], sim.status["recovery"]["replicas"]) == ("Shrink", 3)
    shrink_at = sim.now
    finish_resize(sim, ("n1", "n2", "n3"))
    assert sim.status["workers"] == 3 and sim.status["lastResize"]["schedulableNodes"] == 4
    return sim, shrink_at


def test_a_grown_gang_that_cannot_be_placed_shrinks_and_does_not_flap_between_sizes() -> None:
    sim, _ = grown_then_shrunk()
    sim.step(dt=WINDOW * 3)  # the same nodes never trigger another grow-back
    assert "recovery" not in sim.status and sim.status["workers"] == 3
    assert recovery_reasons(sim)[-2:] == ["GrowBack", "Shrink"]


def test_at_most_one_resize_per_window() -> None:
    sim, shrink_at = grown_then_shrunk()
    # A node Ready for an hour joins (uncordoned) right after the shrink: it fits, but the job
    # resized less than a window ago.
    sim.nodes["n5"] = ready_node("n5", T0 - 3600)
    sim.step(dt=shrink_at + WINDOW - 1 - sim.now)
    assert "recovery" not in sim.status
    sim.step(dt=2)
    assert (sim.status["recovery"]["reason"], sim.status["recovery"]["replicas"]) == ("GrowBack", 4)


def test_grow_back_waits_for_a_checkpoint_save_to_finish_when_progress_is_known() -> None:
    sim = shrunk(progress={"startupSeconds": 600, "stallSeconds": 600, "saveEverySteps": 10})
    attempt = sim.status["attempt"]
    restore(sim, "n3")
    restore(sim, "n4")
    sim.progress = ProgressView(attempt=attempt, global_step=20, step=20, at=sim.now + WINDOW + 1)
    result = sim.step(dt=WINDOW + 1)
    # Step 20 saves a checkpoint: the save may be in progress.
    assert "recovery" not in sim.status
    assert "waiting for the step after the next checkpoint save (every 10 steps)" in sim.status["message"]
    assert [e.reason for e in result.events] == ["GrowBackWaiting"]
    assert result.requeue_after <= 1.0
    sim.progress = ProgressView(attempt=attempt, global_step=28, step=28, at=sim.now + 1)
    result = sim.step(dt=1)
    assert "recovery" not in sim.status  # late in the interval: the next save is near
    assert not [e for e in result.events if e.reason == "GrowBackWaiting"]  # said once
    sim.progress = ProgressView(attempt=attempt, global_step=31, step=31, at=sim.now + 1)
    sim.step(dt=1)
    rec = sim.status["recovery"]
    assert rec["reason"] == "GrowBack"
    assert "step 31 follows the checkpoint save of step 30" in rec["message"]


def test_without_progress_grow_back_goes_on_and_says_it_cannot_tell() -> None:
    sim = shrunk()
    restore(sim, "n3")
    restore(sim, "n4")
    result = sim.step(dt=WINDOW + 1)
    assert sim.status["recovery"]["reason"] == "GrowBack"
    started = [e for e in result.events if e.reason == "RecoveryStarted"]
    assert started and "cannot tell whether a checkpoint save is in progress" in started[0].message
    assert "cannot tell" in sim.status["recovery"]["message"]
    finish_resize(sim, NODES)
    entry = sim.status["recoveries"][-1]
    assert entry["reason"] == "GrowBack" and "cannot tell" in entry["message"]


def test_grow_back_switched_off() -> None:
    sim = shrunk(elastic={"growBackAfterSeconds": 0})
    restore(sim, "n3")
    restore(sim, "n4")
    sim.step(dt=WINDOW * 10)
    assert "recovery" not in sim.status and sim.status["workers"] == 2
    assert "GrowBack" not in recovery_reasons(sim)


def test_grow_back_only_to_allowed_factorable_sizes_and_never_above_replicas() -> None:
    sim = shrunk()
    restore(sim, "n3")  # room for 3 workers; 3 ranks cannot be factored (the fake layout)
    result = sim.step(dt=WINDOW + 1)
    assert "recovery" not in sim.status
    assert "no allowed larger size fits" in sim.status["message"]
    assert any(e.reason == "GrowBackWaiting" for e in result.events)
    for extra in ("n4", "n5", "n6"):  # room for 6 workers: spec.replicas is 4
        restore(sim, extra)
    sim.step(dt=WINDOW + 1)
    assert (sim.status["recovery"]["reason"], sim.status["recovery"]["replicas"]) == ("GrowBack", 4)

    sim = shrunk(elastic={"validSizes": [2, 4]})
    sim.planner.factorable = lambda world_size, config_text: True  # type: ignore[method-assign]
    restore(sim, "n3")  # 3 fits but is not a valid size
    sim.step(dt=WINDOW + 1)
    assert "recovery" not in sim.status


def test_cordoned_lost_or_quarantined_nodes_do_not_count() -> None:
    sim = shrunk()
    restore(sim, "n3")
    sim.nodes["n4"] = dataclasses.replace(ready_node("n4", sim.now), unschedulable=True)
    sim.step(dt=WINDOW + 1)
    assert "recovery" not in sim.status  # n4 is cordoned: room for 3, which is not allowed
    sim.nodes["n4"] = ready_node("n4", T0 - 3600)
    sim.frozen.add("n4")  # Ready, but its heartbeat stopped long ago: lost
    sim.step(dt=1)
    assert "recovery" not in sim.status
    sim.frozen.discard("n4")
    sim.step(dt=1)
    assert sim.status["recovery"]["reason"] == "GrowBack"


def test_node_tracker_reports_when_a_node_became_ready_and_whether_it_is_cordoned() -> None:
    from relaunch.controller.nodes import NodeTracker

    nodes = [
        {
            "metadata": {"name": "n1"},
            "spec": {"unschedulable": True},
            "status": {
                "conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": "2027-01-15T08:00:00Z"}
                ]
            },
        },
        {
            "metadata": {"name": "n2"},
            "status": {
                "conditions": [
                    {"type": "Ready", "status": "False", "lastTransitionTime": "2027-01-15T08:00:00Z"}
                ]
            },
        },
    ]

    class FakeKube:
        def get(self, path: str, query: Any = None) -> dict[str, Any]:
            return {"items": nodes if path == "/api/v1/nodes" else []}

    changes: list[int] = []
    tracker = NodeTracker(FakeKube(), on_change=lambda: changes.append(1))  # type: ignore[arg-type]
    tracker.nodes.list_once()
    snap = tracker.snapshot()
    assert snap is not None
    assert snap["n1"].ready_since == T0 and snap["n1"].unschedulable is True
    assert snap["n2"].ready_since is None and snap["n2"].unschedulable is False
    # Ready again since a later time, with no change of Ready seen in between (a quick flap).
    nodes[0]["status"]["conditions"][0]["lastTransitionTime"] = "2027-01-15T08:00:30Z"
    tracker.node_event("MODIFIED", nodes[0])
    assert tracker.snapshot()["n1"].ready_since == T0 + 30  # type: ignore[index]
    assert changes == [1, 1]


def test_the_crd_declares_the_field_its_default_and_what_grow_back_writes() -> None:
    import yaml
    from test_crd import CRD_PATH, schema, undeclared

    crd = yaml.safe_load(CRD_PATH.read_text())
    root = schema(crd)["properties"]
    field = root["spec"]["properties"]["elastic"]["properties"]["growBackAfterSeconds"]
    assert (field["default"], field["minimum"]) == (DEFAULT_GROW_BACK_AFTER_SECONDS, 0)
    sim = shrunk()
    restore(sim, "n3")
    restore(sim, "n4")
    sim.step(dt=WINDOW + 1)
    assert sim.status["lastResize"]["reason"] == "GrowBack"
    finish_resize(sim, NODES)
    assert undeclared(sim.status, root["status"], "status") == []
