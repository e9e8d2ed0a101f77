"""Conversion ahead of need (``spec.elastic.preconvert``): the pure decisions.

While an elastic job trains, a low-priority helper Job (``relaunch preconvert``) converts its
newest complete checkpoint for the size the job would resize to next, into the very directory a
recovery's plan would convert it to (``<output_dir>/relaunch/unified-...`` or
``resharded-...-w<N>``). A later shrink or grow-back whose plan chooses that step finds the
destination finished (its completion marker, every listed file at its recorded size) and resumes
from it without a conversion Job; any other step is converted on the recovery path as before.

This module owns, without I/O:

- :func:`target_workers`: the size to prepare for (the next shrink, or after a shrink the
  grow-back size);
- :func:`due`: whether a new pre-conversion Job should start now (after each new checkpoint save
  seen in the step lines, else every ``intervalSeconds``; one at a time per job);
- :func:`retain`: which kept pre-conversions go, so that at most ``keep`` stay within the disk
  budget, and whether the next one fits at all;
- the helper's command line and the report it writes to its termination message.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from relaunch.model import TrainingJobSpec

#: The manifest of the pre-conversions relaunch keeps, in the conversion directory.
MANIFEST_NAME = "preconverted.json"
MANIFEST_VERSION = 1
REPORT_VERSION = 1
#: What the helper reports (``state``): converted or already there, nothing to do, refused by the
#: disk budget, or failed (the message says why).
STATES = ("Ready", "Nothing", "BudgetExceeded", "Failed")


def target_workers(spec: TrainingJobSpec, workers: int, factorable: Callable[[int], bool]) -> int | None:
    """The worker count a running gang of ``workers`` would resize to next, or None.

    Below ``spec.replicas`` with grow-back on: the largest allowed size above it (what a grow-back
    restarts at once the nodes are back). Otherwise the largest allowed size below it (what a
    shrink after losing one node's workers restarts at). ``factorable(world_size)`` says whether
    the config's parallel layout takes that many ranks.
    """
    elastic = spec.elastic
    if elastic is None or not elastic.preconvert.enabled:
        return None
    sizes = elastic.sizes(spec.replicas)
    ok = [s for s in sizes if factorable(s * spec.ranks_per_worker)]
    if workers < spec.replicas and elastic.grow_back_after_seconds > 0:
        larger = [s for s in ok if workers < s <= spec.replicas]
        if larger:
            return max(larger)
    smaller = [s for s in ok if elastic.min_replicas <= s < workers]
    return max(smaller) if smaller else None


@dataclass(frozen=True)
class Due:
    start: bool
    why: str = ""
    #: The step whose save started it (progress-triggered), recorded so that the same save does
    #: not start another Job.
    saved_step: int | None = None
    #: When to look again if not now (None: an event or a step line will tell).
    wake_at: float | None = None


def due(
    state: Mapping[str, Any],
    *,
    attempt: int,
    target: int,
    global_step: int | None,
    save_every: int | None,
    now: float,
    finished_at: float | None,
    interval: float,
) -> Due:
    """Whether a pre-conversion Job should start now (no other one runs: the caller checks).

    A new gang (attempt) or a new target size starts one at once. Then, with a known save
    interval and the newest step line (``global_step``), one after each save: at the first step
    line after a saving step (the save is finished, or rejected by the scan if it is not). Without
    them, every ``interval`` seconds after the last one finished.
    """
    if state.get("attempt") != attempt or state.get("targetWorkers") != target:
        return Due(True, "a new gang or target size", _last_save(global_step, save_every))
    if save_every is not None and global_step is not None:
        saved = _last_save(global_step, save_every)
        last = state.get("savedStep")
        if saved is not None and saved > 0 and global_step > saved and (last is None or saved > int(last)):
            return Due(True, f"the checkpoint save of step {saved}", saved)
        return Due(False)
    if finished_at is None:
        return Due(True, "no pre-conversion finished yet")
    if now >= finished_at + interval:
        return Due(True, f"{interval:g}s since the last pre-conversion")
    return Due(False, wake_at=finished_at + interval)


def _last_save(global_step: int | None, save_every: int | None) -> int | None:
    if global_step is None or save_every is None or save_every < 1:
        return None
    return global_step - global_step % save_every


@dataclass(frozen=True)
class Kept:
    """One pre-conversion kept on disk (an entry of the manifest)."""

    destination: str
    step: int | None
    epoch: int | None
    world_size: int
    bytes: int

    @property
    def order(self) -> tuple[int, int]:
        return (self.epoch or 0, self.step or 0)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"destination": self.destination, "worldSize": self.world_size}
        out["bytes"] = self.bytes
        if self.step is not None:
            out["step"] = self.step
        if self.epoch is not None:
            out["epoch"] = self.epoch
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Kept:
        return cls(
            destination=str(data["destination"]),
            step=int(data["step"]) if data.get("step") is not None else None,
            epoch=int(data["epoch"]) if data.get("epoch") is not None else None,
            world_size=int(data["worldSize"]),
            bytes=int(data.get("bytes") or 0),
        )


@dataclass(frozen=True)
class Retention:
    remove: tuple[Kept, ...]
    #: Whether the new pre-conversion may be written (False: the budget cannot hold it).
    fits: bool = True
    why: str = ""


def retain(
    kept: Sequence[Kept],
    *,
    keep: int,
    budget: int | None,
    new_destination: str | None = None,
    new_bytes: int = 0,
    protected: Sequence[str] = (),
) -> Retention:
    """Which kept pre-conversions to remove so that, with the new one (``new_destination`` of
    about ``new_bytes``; None when nothing new is written), at most ``keep`` remain and they fit
    ``budget`` bytes. The oldest (by epoch, step) go first; a ``protected`` directory (the
    conversion the running gang loaded: its next recovery may need it) is never removed but
    counts against the budget. When even without the older ones the new one does not fit, it is
    not written (``fits`` False) and only those beyond ``keep`` go.
    """
    others = sorted(
        (k for k in kept if k.destination != new_destination), key=lambda k: k.order, reverse=True
    )
    guarded = [k for k in others if k.destination in protected]
    free = [k for k in others if k.destination not in protected]
    slots = keep - 1 if new_destination is not None else keep
    stay = free[: max(0, slots)]
    beyond = free[max(0, slots) :]
    if budget is None or new_destination is None:
        return Retention(tuple(beyond))
    held = sum(k.bytes for k in guarded)
    if held + new_bytes > budget:
        why = (
            f"the pre-conversion needs about {new_bytes} bytes and the budget "
            f"(spec.elastic.preconvert.budgetBytes) is {budget}"
            + (f", of which {held} hold the conversion the running gang loaded" if held else "")
        )
        over_keep = free[keep:]
        return Retention(tuple(over_keep), fits=False, why=why)
    while stay and held + sum(k.bytes for k in stay) + new_bytes > budget:
        beyond.insert(0, stay.pop())
    return Retention(tuple(beyond))


def command(
    spec: TrainingJobSpec,
    *,
    world_size: int,
    target_world_size: int,
    last_conversion: str | None,
    termination_log: str,
) -> list[str]:
    """``relaunch preconvert`` for the job's checkpoint settings and sizes."""
    ckpt = spec.checkpoint
    assert spec.elastic is not None and ckpt.strategy_dir is not None
    pc = spec.elastic.preconvert
    cmd = [
        "relaunch",
        "preconvert",
        ckpt.dir,
        "--world-size",
        str(world_size),
        "--target-world-size",
        str(target_world_size),
        "--strategy-dir",
        ckpt.strategy_dir,
        "--conversion",
        ckpt.conversion,
        "--keep",
        str(pc.keep),
    ]
    if pc.budget_bytes is not None:
        cmd += ["--budget-bytes", str(pc.budget_bytes)]
    if pc.max_write_bytes_per_second is not None:
        cmd += ["--max-write-bytes-per-second", str(pc.max_write_bytes_per_second)]
    if last_conversion:
        cmd += ["--last-conversion", last_conversion]
    cmd += ["--termination-log", termination_log]
    return cmd


@dataclass(frozen=True)
class Report:
    """What ``relaunch preconvert`` reports through its termination message."""

    state: str
    message: str = ""
    step: int | None = None
    epoch: int | None = None
    world_size: int | None = None
    destination: str | None = None
    converted: bool = False  # written by this run (False: it was ready already)
    kept: tuple[Kept, ...] = ()
    removed: tuple[str, ...] = ()
    seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": REPORT_VERSION, "state": self.state, "message": self.message[:480]}
        for key, value in (
            ("step", self.step),
            ("epoch", self.epoch),
            ("world_size", self.world_size),
            ("destination", self.destination),
            ("seconds", self.seconds),
        ):
            if value is not None:
                out[key] = value
        if self.converted:
            out["converted"] = True
        out["kept"] = [k.to_json() for k in self.kept]
        if self.removed:
            out["removed"] = list(self.removed)
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def parse(cls, text: str) -> Report:
        """Read a termination message; raise ValueError for one that is not a report."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError("not an object")
            if "state" not in data:
                # relaunch preconvert could not start (bad arguments): {"version", "error"}
                return cls("Failed", str(data.get("error") or text)[:480])
            if data["state"] not in STATES:
                raise ValueError(f"unknown state {data['state']!r}")
            return cls(
                state=data["state"],
                message=str(data.get("message") or ""),
                step=data.get("step"),
                epoch=data.get("epoch"),
                world_size=data.get("world_size"),
                destination=data.get("destination"),
                converted=bool(data.get("converted", False)),
                kept=tuple(Kept.from_json(k) for k in data.get("kept") or []),
                removed=tuple(str(r) for r in data.get("removed") or []),
                seconds=data.get("seconds"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a pre-conversion report ({exc}): {text[:200]!r}") from exc


def used_preconversion(conversion_record: str | None, preconverted: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a plan's conversion record (JSON) resumes from one of the ``preconverted`` entries
    (``status.preconverted``) without converting: the record says ``reused``."""
    if not conversion_record:
        return False
    try:
        record = json.loads(conversion_record)
    except ValueError:
        return False
    if not isinstance(record, dict) or not record.get("reused"):
        return False
    return any(entry.get("destination") == record.get("destination") for entry in preconverted)
