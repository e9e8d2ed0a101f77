"""The node agent: stands in for the kubelet of N nodes and runs their pods as local processes.

Started by ``python -m e2e.cluster up`` (``python -m e2e.nodeagent --help``). What it does:

* **Nodes**: registers each Node (capacity, addresses ``127.<b>.0.<i>``, a ``Ready`` condition),
  renews its ``Lease`` in ``kube-node-lease`` every 2 s and its status every 10 s, like a kubelet.
* **Pods** bound to its nodes (by the real scheduler) run as child processes: each container's
  ``command`` + ``args`` (images are ignored; the project's venv ``bin/`` is first on ``PATH``),
  with ``env``/``envFrom`` (downward-API ``fieldRef``, configMap/secret keys, ``$(VAR)``
  expansion), ``workingDir``, and the Kubernetes service environment
  (``KUBERNETES_SERVICE_HOST=127.0.0.1``, ``KUBERNETES_SERVICE_PORT=<secure port>``).
* **Volumes** become host folders under ``<state>/pods/<ns>/<pod>/<uid>/volumes/``: emptyDir
  (a folder), configMap/secret/downwardAPI/projected (materialised files, including the
  service-account token from the TokenRequest API, bound to the pod), hostPath (as is), and
  persistentVolumeClaim (the bound PV's hostPath; the agent provisions PVs for the default
  StorageClass ``testbed`` in ``<state>/pv/<ns>/<claim>-<uid8>/``, shared by every pod using the
  claim, like NFS). Each container runs in its own mount and UTS namespace
  (``unshare --mount --uts``) where every volume is bind-mounted at its ``mountPath`` and the
  termination-message file at ``terminationMessagePath``; its hostname is the pod's. The sources
  are staged first, so a mount at ``/tmp`` (or over the state dir) hides none of them
  (``mount_script``).
* **Networking**: each pod gets its own loopback address ``127.<b>.<x>.<y>`` as ``status.podIP``.
  Names are published in a managed block of ``/etc/hosts``: ``<hostname>.<subdomain>.<ns>.svc``
  (and ``.svc.cluster.local``) for pods whose ``subdomain`` names a headless Service, the
  headless Service's own name for the Running pods it selects, and the pod's bare hostname.
* **Status** is reported like a kubelet: Pending → Running (podIP, hostIP, containerStatuses
  with ``state.running.startedAt``, conditions) → Succeeded/Failed with exit code, reason and
  termination message; ``restartPolicy`` Never/OnFailure/Always; graceful deletion (SIGTERM,
  grace period, SIGKILL, then a terminal phase is reported -- also for a pod deleted before it
  ran, as a kubelet does -- and the pod is deleted with grace 0). Status goes out as a strategic
  merge patch of ``pods/status``: conditions merge by ``type``, so the ``DisruptionTarget`` that
  the Eviction API sets stays.
* **Controls** over HTTP on 127.0.0.1 (client: ``e2e.cluster.AgentControl``):
  ``POST /kill_pod/<ns>/<pod>`` (SIGKILL), ``POST /lose_node/<node>`` (heartbeats stop,
  processes are SIGKILLed, the node's pods freeze: a powered-off machine),
  ``POST /restore_node/<node>``, ``POST /pause_pod/<ns>/<pod>`` and ``/resume_pod/<ns>/<pod>``
  (SIGSTOP/SIGCONT to each container's process group: a hang the API still shows as Running),
  ``POST /hold_pods/<ns>?selector=k=v,...`` and ``/release_pods/<ns>?selector=...`` (matching
  pods that have not started stay Pending with containers waiting in ``ContainerCreating``, as on
  a kubelet slow to mount a volume, until released), ``GET /status``, ``GET /healthz``.

Pods share the host's network namespace: a pod listening on ``0.0.0.0:<port>`` takes that port
from every other pod (of every cluster on the machine); servers should bind ``$(POD_IP)``
(``status.podIP`` through a ``fieldRef``). Mount points created on the host for ``mountPath``s
(``/shared/output``, ``/dev/termination-log``, the staging folder ``/run/relaunch-testbed-stage``,
...) are left in place: removing one would detach that path's mounts in the pods of any other
cluster running at the time.

Probes: readiness and liveness (httpGet and tcpSocket against the pod IP, exec inside the
container's namespaces); a container without a readiness probe is Ready as soon as it runs.
Logs: each container's stdout and stderr go through one pipe (one stream, in order) to the plain
``<pod dir>/<container>.log`` (every run appended; ``Cluster.pod_log`` reads it) and to a CRI log
file per run, ``<pod dir>/containers/<container>/<restart>.log``, each line stamped with the time it
arrived. Each node serves the kubelet's ``GET /containerLogs/<ns>/<pod>/<container>`` over HTTPS on
its own address (port 10250, or one the kernel picks if that is taken anywhere, published in the
Node's ``status.daemonEndpoints``), with a serving certificate for that address signed by the
cluster CA, to clients with a certificate from the same CA (the API server's kubelet client): so
``pods/log`` and ``kubectl logs [-f]`` work through the API server. Honoured: ``follow`` (chunked,
each write flushed, until the run's output ends or the client leaves), ``tailLines`` (and the
older ``tail``), ``limitBytes``, ``sinceSeconds``/``sinceTime``, ``timestamps``, ``previous`` (the
run before the last). A lost node's endpoint refuses connections; a stream open when it was lost
stops and is reset when the node comes back.

Not done: startup and grpc probes (taken as passing; a startup probe also disables the
liveness probe, which would wait for it), resource limits, ClusterIP
Services (no kube-proxy: use headless Services and pod names), image entrypoints (a container
needs a ``command``), ``kubectl exec``/``attach``/``port-forward``, split ``stdout``/``stderr``
log streams (the alpha ``stream`` query), authorization of log requests beyond the client
certificate (a kubelet would ask the API server with a SubjectAccessReview).

The package, by concern: ``agent`` (the nodes, the pod watch, storage, names, the controls'
actions, ``main``), ``pods`` (a pod's containers as processes, its status), ``podenv`` (a
container's environment and the pod's volumes as host folders), ``mounts`` (the mount namespace
script), ``logs`` (CRI log files and their rendering), ``kubelet`` (the log endpoint),
``controls`` (the control API), ``client`` (the REST client), ``hosts`` (``/etc/hosts`` and the
address range shared with other agents on the machine), ``common`` (settings every part uses).
"""

from __future__ import annotations

from e2e.nodeagent.agent import main
from e2e.nodeagent.controls import parse_selector, selector_matches
from e2e.nodeagent.hosts import remove_hosts_block
from e2e.nodeagent.logs import LogOptions, LogRenderer, cri_records, parse_rfc3339, tail_start
from e2e.nodeagent.mounts import STAGE_CANDIDATES, choose_stage, keep_image_visible, mount_script
from e2e.nodeagent.pods import process_state

__all__ = [
    "STAGE_CANDIDATES",
    "LogOptions",
    "LogRenderer",
    "choose_stage",
    "cri_records",
    "keep_image_visible",
    "main",
    "mount_script",
    "parse_rfc3339",
    "parse_selector",
    "process_state",
    "remove_hosts_block",
    "selector_matches",
    "tail_start",
]
