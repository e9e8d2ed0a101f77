"""What a job's round sees: the watched pods and Jobs with the operator's own writes laid over
them until the watches deliver them (relaunch.controller.cache), and the node tracker's trust
in heartbeats."""

from __future__ import annotations

from typing import Any

from relaunch import resources
from relaunch.controller import cache
from relaunch.controller.cache import Owned, newer


def pod(name: str, version: str, job: str = "demo", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "resourceVersion": version, "labels": {resources.LABEL_JOB: job}}
    if deleting:
        meta["deletionTimestamp"] = "2027-01-15T08:00:00Z"
    return {"metadata": meta}


def owned(pods: list[dict[str, Any]], jobs: list[dict[str, Any]] | None = None) -> Owned:
    store = Owned()
    # kopf's index: key -> the values of every object under it (a mapping is what the code reads).
    store.indices = {"Pod": {("ns", "demo"): pods}, "Job": {("ns", "demo"): jobs or []}, "Workload": {}}
    return store


def names(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(o["metadata"]["name"] for o in objects)


def test_a_created_pod_is_seen_before_the_watch_delivers_it_and_then_the_watch_wins() -> None:
    watched: list[dict[str, Any]] = []
    store = owned(watched)
    store.created("Pod", "ns", pod("demo-1-0", "10"))
    store.created("Pod", "other", pod("demo-1-0", "11"))  # another namespace's namesake
    seen = store.of("ns", "demo")
    assert names(seen["Pod"]) == ["demo-1-0"] and seen["Job"] == [] and seen["Workload"] == []
    watched.append(pod("demo-1-0", "12") | {"status": {"phase": "Running"}})
    pods = store.of("ns", "demo")["Pod"]
    assert pods[0]["status"]["phase"] == "Running"
    assert ("Pod", "ns", "demo-1-0") not in store._created  # caught up: the overlay entry is gone


def test_an_older_watched_version_does_not_hide_the_created_one() -> None:
    watched = [pod("demo-1-0", "9")]
    store = owned(watched)
    store.created("Pod", "ns", pod("demo-1-0", "10") | {"status": {"phase": "Pending"}})
    assert store.of("ns", "demo")["Pod"][0]["metadata"]["resourceVersion"] == "10"


def test_a_deleted_pod_is_seen_deleting_until_the_watch_says_so_or_it_is_gone() -> None:
    watched = [pod("demo-1-0", "10"), pod("demo-1-1", "11")]
    store = owned(watched)
    store.deleted("Pod", "ns", "demo-1-0")
    pods = {p["metadata"]["name"]: p for p in store.of("ns", "demo")["Pod"]}
    assert pods["demo-1-0"]["metadata"]["deletionTimestamp"]
    assert "deletionTimestamp" not in pods["demo-1-1"]["metadata"]
    assert "deletionTimestamp" not in watched[0]["metadata"]  # the index itself is never changed
    watched[0] = pod("demo-1-0", "12", deleting=True)
    store.of("ns", "demo")
    assert not store._deleted
    watched.pop(0)
    assert names(store.of("ns", "demo")["Pod"]) == ["demo-1-1"]


def test_an_overlay_that_the_watch_never_confirms_expires(monkeypatch: Any) -> None:
    store = owned([])
    store.created("Pod", "ns", pod("demo-1-0", "10"))
    clock = [1000.0]
    monkeypatch.setattr(cache.time, "monotonic", lambda: clock[0])
    store._created = {k: (v[0], 1000.0) for k, v in store._created.items()}
    assert names(store.of("ns", "demo")["Pod"]) == ["demo-1-0"]
    clock[0] += cache.OVERLAY_SECONDS + 1
    assert store.of("ns", "demo")["Pod"] == []


def test_resource_versions_compare_as_numbers_and_unreadable_ones_let_the_watch_win() -> None:
    assert newer(pod("a", "100"), pod("a", "99")) and not newer(pod("a", "99"), pod("a", "100"))
    assert newer(pod("a", "x"), pod("a", "100")) and newer(pod("a", "5"), None)


def test_a_workload_the_operator_patched_is_seen_as_patched_until_the_watch_catches_up() -> None:
    watched = [pod("demo-wl", "20") | {"status": {"admission": {"clusterQueue": "cq"}}}]
    store = owned([])
    store.indices["Workload"] = {("ns", "demo"): watched}
    store.created("Workload", "ns", pod("demo-wl", "21") | {"status": {}})  # quota given back
    assert store.of("ns", "demo")["Workload"][0]["status"] == {}
    watched[0] = pod("demo-wl", "22") | {"status": {"admission": {"clusterQueue": "cq"}}}  # readmitted
    assert store.of("ns", "demo")["Workload"][0]["status"]["admission"]
