"""Reads and writes for one TrainingJob: what it owns, as the watches show it, and its actions.

A round reads memory only: the TrainingJob as its newest event (or the operator's own status
write) showed it, its pods and Jobs from :class:`relaunch.controller.cache.Owned`, nodes from
:class:`relaunch.controller.nodes.NodeTracker`, a configMapRef from
:class:`relaunch.controller.cache.ConfigMaps`. It requests only what changes the cluster: creates,
deletes and the status write, each recorded in the cache as it succeeds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from relaunch import resources
from relaunch.controller import kueue
from relaunch.controller.cache import KINDS, ConfigMaps, Owned
from relaunch.controller.kube import (
    Kube,
    KubeError,
    collection_path,
    merge_patch,
    owner_uid,
    trainingjob_path,
)
from relaunch.controller.reconcile import (
    Action,
    ApiProblem,
    Create,
    DeleteJob,
    DeletePod,
    ForeignObject,
    NodeView,
    Observed,
)
from relaunch.controller.views import helper_job_view, pod_view
from relaunch.model import TrainingJobSpec

log = logging.getLogger(__name__)


class ActionFailed(Exception):
    """An action the API server did not carry out, as the :class:`ApiProblem` the status shows."""

    def __init__(self, action: Action, error: KubeError) -> None:
        self.action = action
        self.error = error
        if isinstance(action, Create):
            verb, kind, name = "create", action.manifest["kind"], action.manifest["metadata"]["name"]
        elif isinstance(action, kueue.PatchWorkload):
            verb, kind, name = "patch", "Workload", action.name
        elif isinstance(action, kueue.DeleteWorkload):
            verb, kind, name = "delete", "Workload", action.name
        else:
            verb, kind, name = "delete", "Pod" if isinstance(action, DeletePod) else "Job", action.name
        self.problem = ApiProblem(verb, kind, name, error.status, error.message, error.retry_after)
        super().__init__(str(error))


class JobIO:
    """Reads and writes for one TrainingJob: found by namespace and name, its objects told
    apart by their owner's uid (a namesake's leftovers carry the same name label)."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        uid: str = "",
        *,
        owned: Owned | None = None,
        configmaps: ConfigMaps | None = None,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.uid = uid
        self.owned = owned
        self.configmaps = configmaps

    def list_owned(self) -> dict[str, list[dict[str, Any]]]:
        """The job's pods, Jobs and Workloads read from the API (for tools and tests; the loops
        read :class:`Owned`)."""
        selector = f"{resources.LABEL_JOB}={self.name}"
        return {kind: self.kube.list(collection_path(kind, self.namespace), selector) for kind in KINDS}

    def observe(
        self,
        spec: TrainingJobSpec | None,
        nodes: Mapping[str, NodeView] | None,
        owned: Mapping[str, list[dict[str, Any]]],
        labels: Mapping[str, str] | None = None,
    ) -> Observed:
        """What the round sees; ``owned``: the job's pods, Jobs and Workloads by kind (from
        :class:`relaunch.controller.cache.Owned`, or :meth:`list_owned`)."""
        pods, helper_jobs = owned.get("Pod") or [], owned.get("Job") or []
        workers = []
        helpers = []
        foreign: list[ForeignObject] = []
        for pod in pods:
            meta = pod.get("metadata") or {}
            if self.uid and owner_uid(pod) != self.uid and not _job_pod(pod):
                foreign.append(_foreign("Pod", meta))
                continue
            role = (meta.get("labels") or {}).get(resources.LABEL_ROLE)
            if role == resources.ROLE_WORKER:
                worker = pod_view(pod)
                if worker is not None:
                    workers.append(worker)
            elif role in (resources.ROLE_PLAN, resources.ROLE_CONVERT):
                helpers.append(pod)
        jobs = {}
        for job in helper_jobs:
            meta = job.get("metadata") or {}
            if self.uid and owner_uid(job) != self.uid:
                foreign.append(_foreign("Job", meta))
                continue
            view = helper_job_view(job, helpers)
            jobs[view.name] = view
        config_text, config_error = self._config_text(spec)
        return Observed(
            pods=tuple(workers),
            jobs=jobs,
            nodes=nodes,
            config_text=config_text,
            config_error=config_error,
            foreign=tuple(foreign),
            queue=self._queue(spec, labels, owned.get("Workload") or []),
        )

    def _queue(
        self, spec: TrainingJobSpec | None, labels: Mapping[str, str] | None, workloads: list[dict[str, Any]]
    ) -> kueue.QueueView | None:
        """The job's Kueue Workload (from the watch, with the operator's own writes laid over it),
        when the job is labelled with a queue name; the value of its priority class (one read) only
        while the Workload is still to be created."""
        queue_name, priority_class, kind = kueue.queue_of(labels, spec.template if spec else None)
        if not queue_name or spec is None:
            return None
        name = kueue.workload_name(self.name, self.uid)
        found = next((w for w in workloads if (w.get("metadata") or {}).get("name") == name), None)
        if found is not None and not (self.uid and owner_uid(found) != self.uid):  # not a namesake's
            return kueue.QueueView(queue_name, name, kueue.workload_view(found), priority_class, kind)
        priority, error = None, None
        if priority_class:
            path = (
                f"/apis/{kueue.GROUP}/{kueue.VERSION}/workloadpriorityclasses"
                if kind == "WorkloadPriorityClass"
                else "/apis/scheduling.k8s.io/v1/priorityclasses"
            )
            cls = self.kube.get(f"{path}/{quote(priority_class, safe='')}")
            if cls is None:
                error = f"{kind} {priority_class} does not exist"
            else:
                priority = int(cls.get("value") or 0)
        return kueue.QueueView(queue_name, name, None, priority_class, kind, priority, error)

    def _config_text(self, spec: TrainingJobSpec | None) -> tuple[str | None, str | None]:
        if spec is None or spec.config is None:
            return None, None
        cfg = spec.config
        if cfg.text is not None:
            return cfg.text, None
        if cfg.inline is not None:
            import yaml

            return yaml.safe_dump(dict(cfg.inline), sort_keys=False), None
        assert cfg.config_map is not None
        known, cm = self.configmaps.get(self.namespace, cfg.config_map) if self.configmaps else (False, None)
        if not known:  # its namespace's watch has not listed yet: read it once directly
            path = f"{collection_path('ConfigMap', self.namespace)}/{quote(cfg.config_map, safe='')}"
            cm = self.kube.get(path)
        if cm is None:
            return None, f"ConfigMap {cfg.config_map} (spec.config.configMapRef) does not exist"
        data = cm.get("data") or {}
        if cfg.config_map_key not in data:
            return None, (
                f"ConfigMap {cfg.config_map} has no key {cfg.config_map_key!r} "
                f"(keys: {', '.join(sorted(data)) or 'none'}); set spec.config.configMapRef.key"
            )
        return str(data[cfg.config_map_key]), None

    def apply(self, actions: list[Action]) -> None:
        """Apply actions: the Service/ConfigMap first, then pods and Jobs in parallel."""

        def early(action: Action) -> bool:  # what the workers mount or resolve must exist first
            return isinstance(action, Create) and action.manifest["kind"] in ("ConfigMap", "Service")

        first = [a for a in actions if early(a)]
        rest = [a for a in actions if not early(a)]
        for action in first:
            self._apply_one(action)
        for future in [self.kube.pool.submit(self._apply_one, a) for a in rest]:
            future.result()

    def delete(self, kind: str, name: str) -> None:
        self.kube.delete(f"{collection_path(kind, self.namespace)}/{quote(name, safe='')}")
        if self.owned is not None:
            self.owned.deleted(kind, self.namespace, name)

    def _apply_one(self, action: Action) -> None:
        try:
            self._apply(action)
        except KubeError as error:
            raise ActionFailed(action, error) from error

    def _apply(self, action: Action) -> None:
        if isinstance(action, Create):
            kind = action.manifest["kind"]
            created = self.kube.create_object(collection_path(kind, self.namespace), action.manifest)
            log.debug(
                "%s %s/%s", "created" if created else "exists:", kind, action.manifest["metadata"]["name"]
            )
            if self.owned is not None:
                self.owned.created(kind, self.namespace, created)
        elif isinstance(action, DeletePod):
            path = f"{collection_path('Pod', self.namespace)}/{quote(action.name, safe='')}"
            self.kube.delete(path, grace_seconds=0 if action.force else None)
            if self.owned is not None:
                self.owned.deleted("Pod", self.namespace, action.name)
        elif isinstance(action, DeleteJob):
            self.delete("Job", action.name)
        elif isinstance(action, kueue.DeleteWorkload):
            self.delete("Workload", action.name)
        elif isinstance(action, kueue.PatchWorkload):
            path = f"{collection_path('Workload', self.namespace)}/{quote(action.name, safe='')}"
            path += "/status" if action.status else ""
            done = self.kube.merge_patch_if_unchanged(path, action.patch)
            log.debug(
                "Workload %s (%s): %s", action.name, action.why, "patched" if done else "changed meanwhile"
            )
            if self.owned is not None:
                self.owned.created("Workload", self.namespace, done)

    def patch_status(self, old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any] | None:
        """Write the status change; the TrainingJob as the server returned it (None: no change)."""
        patch = merge_patch(old, new)
        if not patch:
            return None
        path = trainingjob_path(self.namespace, self.name)
        body = self.kube.merge_patch(path + "/status", {"status": patch})
        return body if isinstance(body, dict) else None


def _foreign(kind: str, meta: Mapping[str, Any]) -> ForeignObject:
    return ForeignObject(kind, meta.get("name", ""), bool(meta.get("deletionTimestamp")))


def _job_pod(pod: Mapping[str, Any]) -> bool:
    """A helper Job's pod: owned by its Job, not by the TrainingJob (the Job is checked instead)."""
    return any(ref.get("kind") == "Job" for ref in (pod.get("metadata") or {}).get("ownerReferences") or [])
