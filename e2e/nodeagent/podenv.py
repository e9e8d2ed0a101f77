"""What a pod's containers get from the API: their environment and their volumes as host folders."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from e2e.nodeagent.client import Kube, KubeError
from e2e.nodeagent.common import MACHINE_ENV, NODE_CPU, NODE_MEMORY, POD_MARKER_ENV, SYSTEM_PATH, NotReadyYet

if TYPE_CHECKING:
    from e2e.nodeagent.pods import PodWorker

_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known variables are replaced, ``$$`` escapes, others stay."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(replace, value)


def field_ref(pod: dict[str, Any], path: str, pod_ip: str, host_ip: str) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path in simple:
        return simple[path]
    match = re.fullmatch(r"metadata\.(labels|annotations)(?:\['(.*)'\])?", path)
    if match:
        values = meta.get(match.group(1)) or {}
        if match.group(2) is not None:
            return str(values.get(match.group(2), ""))
        return "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
    raise ValueError(f"unsupported fieldRef {path!r}")


def _write_file(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.replace(path)


class PodInputs:
    """Environment and volumes of the pods of one cluster, read from its API server."""

    def __init__(self, kube: Kube, state_dir: Path, api_port: int, path_prefix: str) -> None:
        self.kube = kube
        self.state_dir = state_dir
        self.api_port = api_port
        self.path_prefix = path_prefix

    def container_env(self, worker: PodWorker, spec: dict[str, Any]) -> dict[str, str]:
        port = str(self.api_port)
        env = {
            "PATH": f"{self.path_prefix}:{SYSTEM_PATH}",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "HOSTNAME": worker.hostname,
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://127.0.0.1:{port}",
            f"KUBERNETES_PORT_{port}_TCP": f"tcp://127.0.0.1:{port}",
            "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
            POD_MARKER_ENV: str(self.state_dir),
        }
        # The machine's own OpenBLAS settings (set on hosts whose CPU older OpenBLAS builds
        # misdetect) reach its processes as they reach the tests' local runs: without them the
        # kernels differ and numerics differ in the last bits from a reference run on the host.
        env.update({k: v for k, v in os.environ.items() if k in MACHINE_ENV})
        ns = worker.ns
        for source in spec.get("envFrom") or []:
            prefix = source.get("prefix", "")
            ref = source.get("configMapRef") or source.get("secretRef")
            if ref is None:
                continue
            data = self.referenced_data(
                "configmaps" if "configMapRef" in source else "secrets",
                ns,
                ref["name"],
                bool(ref.get("optional")),
            )
            for key, value in data.items():
                env[prefix + key] = value.decode(errors="replace")
        for item in spec.get("env") or []:
            name = item["name"]
            if "value" in item or "valueFrom" not in item:
                env[name] = expand(item.get("value", ""), env)
                continue
            source = item["valueFrom"]
            if "fieldRef" in source:
                env[name] = field_ref(
                    worker.pod, source["fieldRef"]["fieldPath"], worker.pod_ip, worker.host_ip
                )
            elif "resourceFieldRef" in source:
                resource = source["resourceFieldRef"]["resource"]
                kind, _, res = resource.partition(".")
                amount = ((spec.get("resources") or {}).get(kind) or {}).get(res)
                env[name] = (
                    str(amount)
                    if amount is not None
                    else {"cpu": NODE_CPU, "memory": NODE_MEMORY}.get(res, "0")
                )
            else:
                key_ref = source.get("configMapKeyRef") or source.get("secretKeyRef")
                if key_ref is None:
                    continue
                kind = "configmaps" if "configMapKeyRef" in source else "secrets"
                data = self.referenced_data(kind, ns, key_ref["name"], bool(key_ref.get("optional")))
                if key_ref["key"] in data:
                    env[name] = data[key_ref["key"]].decode(errors="replace")
                elif not key_ref.get("optional"):
                    raise NotReadyYet(f"{kind[:-1]} {ns}/{key_ref['name']} has no key {key_ref['key']!r}")
        return env

    def referenced_data(self, kind: str, ns: str, name: str, optional: bool) -> dict[str, bytes]:
        """The key → bytes content of a ConfigMap or Secret (empty if optional and missing)."""
        try:
            obj = self.kube.get(f"/api/v1/namespaces/{ns}/{kind}/{name}")
        except KubeError as error:
            if error.status == 404:
                if optional:
                    return {}
                raise NotReadyYet(f"{kind[:-1]} {ns}/{name} not found") from None
            raise
        result: dict[str, bytes] = {}
        if kind == "secrets":
            for key, value in (obj.get("data") or {}).items():
                result[key] = base64.b64decode(value)
        else:
            for key, value in (obj.get("data") or {}).items():
                result[key] = value.encode()
            for key, value in (obj.get("binaryData") or {}).items():
                result[key] = base64.b64decode(value)
        return result

    def write_items(
        self, target: Path, data: dict[str, bytes], items: list[dict[str, Any]] | None, default_mode: int
    ) -> None:
        if items:
            for item in items:
                if item["key"] in data:
                    _write_file(target / item["path"], data[item["key"]], item.get("mode", default_mode))
        else:
            for key, value in data.items():
                _write_file(target / key, value, default_mode)

    def materialise_volume(self, worker: PodWorker, volume: dict[str, Any]) -> Path:
        name = volume["name"]
        target = worker.dir / "volumes" / name
        ns = worker.ns
        if "hostPath" in volume:
            path = Path(volume["hostPath"]["path"])
            kind = volume["hostPath"].get("type", "")
            if kind == "DirectoryOrCreate":
                path.mkdir(parents=True, exist_ok=True)
            elif kind == "FileOrCreate" and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            return path
        if "emptyDir" in volume:
            target.mkdir(parents=True, exist_ok=True)
            return target
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            try:
                pvc = self.kube.get(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{claim}")
            except KubeError as error:
                if error.status == 404:
                    raise NotReadyYet(f"persistentvolumeclaim {ns}/{claim} not found") from None
                raise
            pv_name = pvc["spec"].get("volumeName")
            if not pv_name:
                raise NotReadyYet(f"persistentvolumeclaim {ns}/{claim} is not bound yet")
            pv = self.kube.get(f"/api/v1/persistentvolumes/{pv_name}")
            for kind in ("hostPath", "local"):
                if kind in pv["spec"]:
                    path = Path(pv["spec"][kind]["path"])
                    path.mkdir(parents=True, exist_ok=True)
                    return path
            raise ValueError(
                f"persistentvolume {pv_name} is neither hostPath nor local: the testbed cannot mount it"
            )
        target.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume or "secret" in volume:
            kind = "configmaps" if "configMap" in volume else "secrets"
            source = volume.get("configMap") or volume["secret"]
            obj_name = source.get("name") or source.get("secretName")
            data = self.referenced_data(kind, ns, obj_name, bool(source.get("optional")))
            self.write_items(target, data, source.get("items"), source.get("defaultMode", 0o644))
            return target
        if "downwardAPI" in volume:
            self.write_downward(worker, target, volume["downwardAPI"].get("items") or [], 0o644)
            return target
        if "projected" in volume:
            mode = volume["projected"].get("defaultMode", 0o644)
            for source in volume["projected"].get("sources") or []:
                if "serviceAccountToken" in source:
                    token = self.request_token(worker, source["serviceAccountToken"])
                    _write_file(target / source["serviceAccountToken"]["path"], token.encode(), 0o600)
                elif "configMap" in source or "secret" in source:
                    kind = "configmaps" if "configMap" in source else "secrets"
                    ref = source.get("configMap") or source["secret"]
                    data = self.referenced_data(kind, ns, ref["name"], bool(ref.get("optional")))
                    self.write_items(target, data, ref.get("items"), mode)
                elif "downwardAPI" in source:
                    self.write_downward(worker, target, source["downwardAPI"].get("items") or [], mode)
            return target
        raise ValueError(
            f"volume {name!r}: type {sorted(set(volume) - {'name'})} is not supported by the testbed"
        )

    def write_downward(self, worker: PodWorker, target: Path, items: list[dict[str, Any]], mode: int) -> None:
        for item in items:
            if "fieldRef" in item:
                value = field_ref(worker.pod, item["fieldRef"]["fieldPath"], worker.pod_ip, worker.host_ip)
                _write_file(target / item["path"], value.encode(), item.get("mode", mode))

    def request_token(self, worker: PodWorker, source: dict[str, Any]) -> str:
        account = worker.pod["spec"].get("serviceAccountName") or "default"
        spec: dict[str, Any] = {
            "expirationSeconds": int(source.get("expirationSeconds", 3607)),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": worker.pod_name, "uid": worker.uid},
        }
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        try:
            result = self.kube.post(f"/api/v1/namespaces/{worker.ns}/serviceaccounts/{account}/token", body)
        except KubeError as error:
            if error.status == 404:
                raise NotReadyYet(f"serviceaccount {worker.ns}/{account} not found") from None
            raise
        return str(result["status"]["token"])
