"""Conversion ahead of need (spec.elastic.preconvert): the pure decisions (which size, when, what
to keep) and the state machine around the helper Job (one at a time, collected into the status,
stopped by a recovery, used or not by the recovery's plan)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_reconcile import REF, Sim, make_spec, plan

from relaunch import preconvert, resources
from relaunch.controller.reconcile import HelperJobView, ProgressView, reconcile
from relaunch.model import SpecError, parse_spec
from relaunch.preconvert import Kept, Report, due, retain, target_workers

CHECKPOINT = "/shared/output/checkpoint"
DEST = "/shared/output/relaunch/unified-demo-e1-s10"


def elastic(**preconvert_fields: Any) -> dict[str, Any]:
    return {"minReplicas": 2, "preconvert": {"enabled": True, "intervalSeconds": 10, **preconvert_fields}}


def spec_of(replicas: int = 4, **fields: Any) -> Any:
    return parse_spec(make_spec(replicas=replicas, elastic=elastic(**fields)))


def ready(step: int, destination: str = DEST, *, converted: bool = True, world: int = 2) -> str:
    kept = (Kept(destination, step, 1, world, 1000),)
    return Report(
        "Ready",
        f"step {step} converted",
        step=step,
        epoch=1,
        world_size=world,
        destination=destination,
        converted=converted,
        kept=kept,
        seconds=1.5,
    ).dumps()


# ----------------------------------------------------------------------------------------------
# The spec


def test_the_spec_is_opt_in_and_refuses_what_cannot_work() -> None:
    plain = parse_spec(make_spec(replicas=4, elastic={"minReplicas": 2}))
    assert plain.elastic is not None and plain.elastic.preconvert.enabled is False
    pc = spec_of(keep=2, budgetBytes=10**9, maxWriteBytesPerSecond=10**8).elastic.preconvert
    assert (pc.enabled, pc.keep, pc.budget_bytes, pc.max_write_bytes_per_second) == (True, 2, 10**9, 10**8)
    with pytest.raises(SpecError, match=r"spec\.elastic\.preconvert\.keep must be 1 or 2"):
        spec_of(keep=3)
    with pytest.raises(SpecError, match=r"spec\.elastic\.preconvert\.enabled must be true or false"):
        parse_spec(make_spec(replicas=4, elastic={"minReplicas": 2, "preconvert": {"enabled": "yes"}}))
    with pytest.raises(SpecError, match=r"spec\.elastic\.preconvert\.budgetBytes must be >= 1"):
        spec_of(budgetBytes=0)
    no_strategy = make_spec(replicas=4, elastic=elastic(), checkpoint={"dir": CHECKPOINT})
    with pytest.raises(SpecError, match=r"needs spec\.checkpoint\.strategyDir"):
        parse_spec(no_strategy)
    ckpt = make_spec(
        replicas=4, elastic=elastic(), checkpoint={"dir": CHECKPOINT, "strategyDir": "/s", "format": "ckpt"}
    )
    with pytest.raises(SpecError, match=r"format safetensors"):
        parse_spec(ckpt)
    pinned = make_spec(
        replicas=4,
        elastic=elastic(),
        checkpoint={"dir": CHECKPOINT, "strategyDir": "/s", "resume": "net_rank_0-1_10.safetensors"},
    )
    with pytest.raises(SpecError, match=r"resume Latest"):
        parse_spec(pinned)


# ----------------------------------------------------------------------------------------------
# Which size, when


def test_the_target_is_the_next_shrink_and_after_a_shrink_the_grow_back() -> None:
    spec = spec_of(replicas=4)
    every = lambda world: True  # noqa: E731
    no_three = lambda world: world != 3  # noqa: E731
    assert target_workers(spec, 4, every) == 3
    assert target_workers(spec, 4, no_three) == 2  # a size the layout cannot take is skipped
    assert target_workers(spec, 3, every) == 4  # after a shrink: the grow-back size
    assert target_workers(spec, 2, no_three) == 4
    no_grow = parse_spec(
        make_spec(replicas=4, elastic={**elastic(), "growBackAfterSeconds": 0, "minReplicas": 2})
    )
    assert target_workers(no_grow, 3, every) == 2  # no grow-back: the next shrink
    assert target_workers(no_grow, 2, every) is None  # nothing smaller allowed
    sizes = parse_spec(make_spec(replicas=8, elastic={**elastic(), "validSizes": [4, 8], "minReplicas": 4}))
    assert target_workers(sizes, 8, every) == 4 and target_workers(sizes, 4, every) == 8
    ranks = parse_spec(make_spec(replicas=4, ranksPerWorker=8, elastic=elastic()))
    assert target_workers(ranks, 4, lambda world: world % 16 == 0) == 2  # judged on ranks
    assert target_workers(parse_spec(make_spec(replicas=4, elastic={"minReplicas": 2})), 4, every) is None


def test_one_job_after_each_save_or_every_interval() -> None:
    base = {"attempt": 2, "targetWorkers": 3}
    kwargs = {"now": 100.0, "finished_at": 90.0, "interval": 30.0}
    # A new gang or a new target: at once.
    assert due({}, attempt=2, target=3, global_step=None, save_every=None, **kwargs).start
    assert due(base, attempt=3, target=3, global_step=None, save_every=None, **kwargs).start
    assert due(base, attempt=2, target=2, global_step=None, save_every=None, **kwargs).start
    first = due({}, attempt=2, target=3, global_step=23, save_every=10, **kwargs)
    assert first.saved_step == 20
    # With step lines: once per save, at the step after it.
    state = {**base, "savedStep": 20}
    assert not due(state, attempt=2, target=3, global_step=29, save_every=10, **kwargs).start
    assert not due(state, attempt=2, target=3, global_step=30, save_every=10, **kwargs).start  # saving
    after = due(state, attempt=2, target=3, global_step=31, save_every=10, **kwargs)
    assert after.start and after.saved_step == 30 and "step 30" in after.why
    # Without: every interval after the last one finished.
    waiting = due(base, attempt=2, target=3, global_step=None, save_every=None, **kwargs)
    assert not waiting.start and waiting.wake_at == 120.0
    assert due(base, attempt=2, target=3, global_step=None, save_every=None, **{**kwargs, "now": 121.0}).start


def kept(step: int, size: int = 100, world: int = 2) -> Kept:
    return Kept(f"/o/relaunch/unified-e1-s{step}", step, 1, world, size)


def test_the_oldest_go_first_within_keep_and_budget_and_the_loaded_one_never() -> None:
    three = [kept(10), kept(30), kept(20)]
    new = "/o/relaunch/unified-e1-s40"
    assert [k.step for k in retain(three, keep=1, budget=None, new_destination=new).remove] == [30, 20, 10]
    assert [k.step for k in retain(three, keep=2, budget=None, new_destination=new).remove] == [20, 10]
    assert [k.step for k in retain(three, keep=2, budget=None).remove] == [10]  # nothing new
    # The budget: 30 stays with the new one (100 + 100 <= 250), not with 150 bytes.
    assert [k.step for k in retain(three, keep=2, budget=250, new_destination=new, new_bytes=100).remove] == [
        20,
        10,
    ]
    tight = retain(three, keep=2, budget=150, new_destination=new, new_bytes=100)
    assert tight.fits and [k.step for k in tight.remove] == [30, 20, 10]
    # Too big even alone: not written; only those beyond keep go.
    refused = retain(three, keep=2, budget=50, new_destination=new, new_bytes=100)
    assert not refused.fits and "budgetBytes" in refused.why and [k.step for k in refused.remove] == [10]
    # The one the running gang loaded stays, and counts.
    loaded = kept(30).destination
    guarded = retain(three, keep=1, budget=250, new_destination=new, new_bytes=100, protected=[loaded])
    assert loaded not in {k.destination for k in guarded.remove} and guarded.fits
    full = retain(three, keep=1, budget=150, new_destination=new, new_bytes=100, protected=[loaded])
    assert not full.fits and "running gang loaded" in full.why
    # The new destination itself (ready already) is never removed.
    again = retain([kept(40)], keep=1, budget=None, new_destination=kept(40).destination)
    assert again.remove == ()


def test_the_report_round_trips_and_a_bad_one_is_refused() -> None:
    report = Report.parse(ready(10))
    assert (report.state, report.step, report.converted, report.kept[0].step) == ("Ready", 10, True, 10)
    assert Report.parse('{"version":1,"error":"bad"}').state == "Failed"
    with pytest.raises(ValueError, match="not a pre-conversion report"):
        Report.parse("garbage")
    with pytest.raises(ValueError, match="unknown state"):
        Report.parse('{"state":"Maybe"}')
    record = json.dumps({"destination": DEST, "reused": True})
    assert preconvert.used_preconversion(record, [{"destination": DEST}])
    assert not preconvert.used_preconversion(record, [{"destination": "/elsewhere"}])
    assert not preconvert.used_preconversion(json.dumps({"destination": DEST}), [{"destination": DEST}])
    assert not preconvert.used_preconversion(None, [{"destination": DEST}])


def test_the_command_carries_the_settings() -> None:
    spec = spec_of(keep=2, budgetBytes=5000, maxWriteBytesPerSecond=100)
    cmd = preconvert.command(
        spec, world_size=4, target_world_size=2, last_conversion='{"x":1}', termination_log="/dev/t"
    )
    assert cmd[:3] == ["relaunch", "preconvert", CHECKPOINT]
    text = " ".join(cmd)
    for part in (
        "--world-size 4",
        "--target-world-size 2",
        "--keep 2",
        "--budget-bytes 5000",
        "--max-write-bytes-per-second 100",
        "--strategy-dir /shared/output/strategy",
        "--conversion Unify",
        "--termination-log /dev/t",
    ):
        assert part in text
    assert cmd[cmd.index("--last-conversion") + 1] == '{"x":1}'


# ----------------------------------------------------------------------------------------------
# The state machine


def running(**fields: Any) -> Sim:
    sim = Sim(make_spec(replicas=4, elastic=elastic(**fields)))
    sim.start_running()
    result = sim.step()  # the round the recovery's end asked for: the first pre-conversion
    assert not preconvert_jobs(sim) or result.requeue_after <= 5.0
    return sim


def preconvert_jobs(sim: Sim) -> list[dict[str, Any]]:
    return [m for m in sim.created if "-preconvert-" in m["metadata"]["name"]]


def test_a_running_gang_gets_one_low_priority_job_at_a_time_and_the_status_says_what_is_ready() -> None:
    sim = running()
    (job,) = preconvert_jobs(sim)
    assert job["metadata"]["name"] == "demo-preconvert-1"
    labels = job["metadata"]["labels"]
    assert labels[resources.LABEL_ROLE] == resources.ROLE_CONVERT
    assert labels[resources.LABEL_PURPOSE] == resources.PURPOSE_PRECONVERT
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["relaunch", "preconvert"]
    # FakePlanner cannot factor 3 ranks: the next shrink is to 2 workers.
    assert command[command.index("--target-world-size") + 1] == "2"
    assert command[command.index("--world-size") + 1] == "4"
    state = sim.status["preconversion"]
    assert (state["state"], state["targetWorkers"], state["attempt"]) == ("Running", 2, 1)

    # One at a time: nothing new while it runs, even past the interval.
    sim.step(dt=30)
    assert len(preconvert_jobs(sim)) == 1

    sim.finish_job("demo-preconvert-1", ready(10))
    sim.step()
    state = sim.status["preconversion"]
    assert (state["state"], state["step"], state["epoch"]) == ("Ready", 10, 1)
    assert sim.status["preconverted"] == [
        {"destination": DEST, "worldSize": 2, "workers": 2, "bytes": 1000, "step": 10, "epoch": 1}
    ]
    assert any(e.reason == "Preconverted" and "step 10" in e.message for e in sim.events)
    assert sim.status["phase"] == "Running"

    # Without step lines: the next one after the interval; the finished one is deleted then.
    sim.step(dt=5)
    assert len(preconvert_jobs(sim)) == 1
    result = sim.step(dt=6)
    assert [m["metadata"]["name"] for m in preconvert_jobs(sim)] == ["demo-preconvert-1", "demo-preconvert-2"]
    assert "demo-preconvert-1" in sim.deleted_jobs
    assert result.requeue_after <= 5.0


def test_with_step_lines_a_job_starts_after_each_save_only() -> None:
    sim = Sim(
        make_spec(
            replicas=4,
            elastic=elastic(),
            progress={"saveEverySteps": 10, "startupSeconds": 600, "stallSeconds": 600},
        )
    )
    sim.start_running()
    assert not preconvert_jobs(sim)
    sim.progress = ProgressView(attempt=1, global_step=3, step=3, at=sim.now)
    sim.step()
    assert len(preconvert_jobs(sim)) == 1  # the new gang's first one
    sim.finish_job("demo-preconvert-1", ready(0, converted=False))
    sim.step()
    sim.progress = ProgressView(attempt=1, global_step=9, step=9, at=sim.now)
    sim.step(dt=60)
    assert len(preconvert_jobs(sim)) == 1  # no save since
    sim.progress = ProgressView(attempt=1, global_step=10, step=10, at=sim.now)
    sim.step()
    assert len(preconvert_jobs(sim)) == 1  # saving now
    sim.progress = ProgressView(attempt=1, global_step=11, step=11, at=sim.now)
    sim.step()
    assert len(preconvert_jobs(sim)) == 2 and sim.status["preconversion"]["savedStep"] == 10
    sim.finish_job("demo-preconvert-2", ready(10))
    sim.step()
    sim.progress = ProgressView(attempt=1, global_step=15, step=15, at=sim.now)
    sim.step(dt=60)
    assert len(preconvert_jobs(sim)) == 2  # the same save never twice


def test_an_operator_restart_mid_pre_conversion_starts_nothing_twice() -> None:
    sim = running()
    status, observed = sim.status, sim.observed()
    # The same round again (the status write was lost after the create): the same Job name.
    before = dict(sim.status)
    before.pop("preconversion")
    again = reconcile(REF, parse_spec(sim.spec_body), 1, before, observed, sim.now, sim.planner)
    names = [a.manifest["metadata"]["name"] for a in again.actions if hasattr(a, "manifest")]
    assert names == ["demo-preconvert-1"]
    # A later round (restart after the write): the Job runs, nothing new.
    later = reconcile(REF, parse_spec(sim.spec_body), 1, status, observed, sim.now + 1, sim.planner)
    assert not [a for a in later.actions if hasattr(a, "manifest")]
    assert later.status["preconversion"]["state"] == "Running"


def test_a_failed_or_killed_job_is_reported_and_nothing_is_marked_ready() -> None:
    sim = running()
    sim.jobs["demo-preconvert-1"] = HelperJobView("demo-preconvert-1", failed=True, exit_code=137)
    sim.step()
    state = sim.status["preconversion"]
    assert state["state"] == "Failed" and "killed by signal 9" in state["message"]
    assert "preconverted" not in sim.status
    assert any(e.reason == "PreconversionFailed" for e in sim.events)
    refused = Report("BudgetExceeded", "step 20 is not pre-converted: the budget ...", step=20).dumps()
    sim.step(dt=11)
    sim.finish_job("demo-preconvert-2", refused)
    sim.step()
    assert sim.status["preconversion"]["state"] == "BudgetExceeded"
    assert [e.reason for e in sim.events].count("PreconversionSkipped") == 1


def shrink_with(sim: Sim, recovery_plan: str) -> None:
    """Lose worker 3's pod; drive the recovery at size 2 (as a shrink would) to running."""
    sim.fail_pod("demo-1-3")
    sim.step()
    sim.finish_deletions()
    sim.step()
    attempt = sim.status["recovery"]["attempt"]
    sim.finish_job(f"demo-plan-{attempt}", recovery_plan)
    sim.step()
    sim.run_all()
    sim.step()


def test_a_recovery_stops_a_running_pre_conversion() -> None:
    sim = running()
    sim.fail_pod("demo-1-3")
    sim.step()
    assert "demo-preconvert-1" in sim.deleted_jobs
    state = sim.status["preconversion"]
    assert state["state"] == "Interrupted" and "recovery started" in state["message"]


def test_a_recovery_resumes_from_the_ready_pre_conversion_without_a_conversion_job() -> None:
    sim = running()
    sim.finish_job("demo-preconvert-1", ready(10))
    sim.step()
    record = json.dumps({"mode": "Unify", "destination": DEST, "world_size": 2, "reused": True})
    shrink_with(sim, plan("resume", step=10, epoch=1, conversion_record=record))
    assert sim.status["phase"] == "Running"
    entry = sim.status["recoveries"][-1]
    assert entry["preconverted"] is True and entry["converted"] is False and entry["fromStep"] == 10
    assert not [m for m in sim.created if m["metadata"]["name"].startswith("demo-convert-")]
    assert sim.status["lastConversion"] == record  # later plans know the fence


def test_a_recovery_whose_step_is_not_pre_converted_converts_on_its_path() -> None:
    sim = running()
    sim.finish_job("demo-preconvert-1", ready(10))
    sim.step()
    other = json.dumps({"mode": "Unify", "destination": "/o/relaunch/unified-e1-s20", "world_size": 2})
    shrink_with(
        sim, plan("convert", step=20, convert_command=["relaunch", "convert"], conversion_record=other)
    )
    attempt = sim.status["recovery"]["attempt"]
    assert any(m["metadata"]["name"] == f"demo-convert-{attempt}" for m in sim.created)
    sim.finish_job(f"demo-convert-{attempt}", "{}")
    sim.step()
    sim.run_all()
    sim.step()
    entry = sim.status["recoveries"][-1]
    assert entry["converted"] is True and "preconverted" not in entry


def test_the_job_runs_beside_the_gang_and_says_why_it_waits() -> None:
    spec_body = make_spec(replicas=4, elastic=elastic())
    spread = {"matchLabels": {"relaunch.dev/job": "demo", "relaunch.dev/role": "worker"}}
    node_rule = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}
    spec_body["template"]["spec"]["affinity"] = {
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": spread, "topologyKey": "kubernetes.io/hostname"}
            ]
        },
        "nodeAffinity": node_rule,
    }
    spec_body["template"]["spec"]["nodeSelector"] = {"pool": "train"}
    spec_body["template"]["spec"]["priorityClassName"] = "training-high"
    manifest = resources.build_preconvert_job(REF, parse_spec(spec_body), 1, 1, ["relaunch", "preconvert"])
    pod = manifest["spec"]["template"]["spec"]
    assert pod["affinity"] == {"nodeAffinity": node_rule}  # no anti-affinity against the workers
    assert pod["nodeSelector"] == {"pool": "train"}
    assert "priorityClassName" not in pod  # never preempts anyone to run
    assert pod["restartPolicy"] == "Never" and manifest["spec"]["backoffLimit"] == 0

    sim = running()
    sim.jobs["demo-preconvert-1"] = HelperJobView(
        "demo-preconvert-1", pod="demo-preconvert-1-x", unschedulable_message="0/3 nodes are available"
    )
    sim.step()
    state = sim.status["preconversion"]
    assert state["state"] == "Running" and "waiting: 0/3 nodes are available" in state["message"]
    assert sim.status["phase"] == "Running"


def test_a_grow_back_waits_for_the_pre_conversion_of_its_size_then_resumes_from_it() -> None:
    from test_grow_back import WINDOW, finish_resize, restore, shrunk

    sim = shrunk(elastic={"preconvert": {"enabled": True, "intervalSeconds": 10}})
    sim.step()  # the shrunk gang's first pre-conversion: for the grow-back size
    state = sim.status["preconversion"]
    assert (state["state"], state["targetWorkers"]) == ("Running", 4), state
    restore(sim, "n3")
    restore(sim, "n4")
    sim.step(dt=WINDOW + 1)
    assert "recovery" not in sim.status
    assert "waits for the pre-conversion" in sim.status["message"]
    assert any(e.reason == "GrowBackWaiting" and "pre-conversion" in e.message for e in sim.events)
    sim.finish_job("demo-preconvert-1", ready(5, world=4))
    sim.step()  # collected
    sim.step()
    rec = sim.status["recovery"]
    assert (rec["reason"], rec["replicas"]) == ("GrowBack", 4)
    assert sim.status["preconversion"]["state"] == "Ready"
    finish_resize(sim, ("n1", "n2", "n3", "n4"))
