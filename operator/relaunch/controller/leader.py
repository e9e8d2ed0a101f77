"""One active replica: leader election through a coordination.k8s.io Lease.

Every replica runs kopf's watches (so a standby's view is warm), but only the holder of the
Lease runs the job loops. The leader renews the Lease every :data:`RETRY_SECONDS`; a standby
tries as often and takes the Lease over once it has seen the same record unchanged for the
Lease's duration (judged by its own clock from when it saw the record change, so clock skew
between machines does not matter). A leader that cannot renew within :data:`RENEW_DEADLINE_SECONDS`
stops acting at once and exits, as client-go's elector does: a round in flight in a worker
thread cannot be cancelled, and a process that lost the Lease must not write again; its
Deployment restarts it as a standby. A leader that shuts down cleanly releases the Lease, so a
standby takes over within one retry interval instead of a Lease duration.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from relaunch.controller.kube import Kube, KubeError

log = logging.getLogger(__name__)

#: The Lease's duration: a standby takes over this long after the leader was last heard.
LEASE_SECONDS = 15
#: A leader that could not renew for this long stops acting.
RENEW_DEADLINE_SECONDS = 10.0
#: How often a standby looks at the Lease.
RETRY_SECONDS = 2.0


def default_identity() -> str:
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _micro_time(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElection:
    """Campaigns for the Lease ``namespace/name`` as ``identity`` (see the module's doc)."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str | None = None,
        *,
        lease_seconds: int = LEASE_SECONDS,
        renew_deadline: float = RENEW_DEADLINE_SECONDS,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self.kube = kube
        ns = quote(namespace, safe="")
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
        self.name = name
        self.identity = identity or default_identity()
        self.lease_seconds = lease_seconds
        self.renew_deadline = renew_deadline
        self.retry_seconds = retry_seconds
        self.leading = False
        self._renewed = 0.0  # monotonic time of the last successful renewal
        self._observed: tuple[Any, ...] | None = None  # the other holder's record as last seen
        self._observed_at = 0.0
        self._lease: dict[str, Any] | None = None  # the Lease as this replica last wrote it

    def try_acquire_or_renew(self) -> bool:
        """One attempt (blocking): whether this replica holds the Lease now."""
        now = time.time()
        # The leader renews from the Lease as it last wrote it (one request); a 409 means
        # somebody else wrote since, and the next attempt reads it again.
        lease = self._lease if self.leading and self._lease else self.kube.get(self._path())
        mine = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.lease_seconds,
            "renewTime": _micro_time(now),
        }
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name},
                "spec": {**mine, "acquireTime": _micro_time(now), "leaseTransitions": 0},
            }
            status, written = self.kube.request("POST", self.path, body=body)
            return self._won(status in (200, 201), written)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        if holder != self.identity:
            record = (holder, spec.get("renewTime"), spec.get("leaseDurationSeconds"))
            if record != self._observed:
                self._observed, self._observed_at = record, time.monotonic()
            duration = float(spec.get("leaseDurationSeconds") or self.lease_seconds)
            if holder and time.monotonic() - self._observed_at < duration:
                return self._won(False, None)
            mine["acquireTime"] = _micro_time(now)
            mine["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        else:
            mine["acquireTime"] = spec.get("acquireTime") or _micro_time(now)
            mine["leaseTransitions"] = int(spec.get("leaseTransitions") or 0)
        # A PUT carrying the resourceVersion read: a concurrent change makes it fail with 409.
        update = {**lease, "spec": {**spec, **mine}}
        status, written = self.kube.request("PUT", self._path(), body=update)
        return self._won(status == 200, written)

    def _path(self) -> str:
        return f"{self.path}/{quote(self.name, safe='')}"

    def _won(self, held: bool, written: Any) -> bool:
        self._lease = written if held and isinstance(written, dict) else None
        if held:
            self._renewed = time.monotonic()
        return held

    def release(self) -> None:
        """Give the Lease up (clean shutdown), so a standby need not wait for it to expire."""
        if not self.leading:
            return
        lease = self.kube.get(self._path())
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        spec = {**(lease.get("spec") or {}), "holderIdentity": None, "leaseDurationSeconds": 1}
        self.kube.request("PUT", self._path(), body={**lease, "spec": spec})
        self.leading = False
        log.info("released the leader lease %s", self.name)

    async def campaign(self, on_started: Callable[[], None], on_lost: Callable[[], None]) -> None:
        """Try for the Lease, then keep renewing it, until cancelled. ``on_started`` runs once
        this replica leads; ``on_lost`` when it could not renew within the deadline."""
        log.info("waiting for the leader lease %s as %s", self.name, self.identity)
        while True:
            try:
                held = await asyncio.to_thread(self.try_acquire_or_renew)
            except KubeError as exc:
                log.warning("leader lease %s: %s", self.name, exc)
                held = False
            except Exception as exc:  # the API server unreachable: count against the deadline
                log.warning("leader lease %s: %s", self.name, exc)
                held = False
            if held and not self.leading:
                self.leading = True
                log.info("acquired the leader lease %s as %s: this replica acts", self.name, self.identity)
                on_started()
            elif self.leading and not held and time.monotonic() - self._renewed > self.renew_deadline:
                self.leading = False
                log.error(
                    "could not renew the leader lease %s for %.0fs: stopping, another replica takes over",
                    self.name,
                    self.renew_deadline,
                )
                on_lost()
                return
            # The leader renews three times per Lease duration; a standby looks every retry.
            await asyncio.sleep(self.lease_seconds / 3 if self.leading else self.retry_seconds)


def exit_now() -> None:
    """Leave at once (see the module's doc for why not a graceful stop)."""
    logging.shutdown()
    os._exit(1)
