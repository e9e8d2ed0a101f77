"""Pods as processes: each pod's worker thread runs its containers and reports its status like a kubelet."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from e2e.nodeagent.client import KubeError, pod_path
from e2e.nodeagent.common import LOG, NotReadyYet, now
from e2e.nodeagent.logs import LogRun
from e2e.nodeagent.podenv import expand

if TYPE_CHECKING:
    from e2e.nodeagent.agent import Agent


def process_state(pid: int) -> str | None:
    """The one-letter state in ``/proc/<pid>/stat`` (``T``: stopped by a signal), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


#: How old a reading of the process table ``signal_all`` may use: when a gang of hundreds of pods is
#: deleted at once, each pod's worker would otherwise read every ``/proc/<pid>/stat`` of the
#: machine twice (SIGTERM, SIGKILL), all under the agent's interpreter lock.
PROCESS_TABLE_MAX_AGE_S = 0.1
_process_table: tuple[float, dict[int, list[int]]] = (float("-inf"), {})
_process_table_lock = threading.Lock()


def _read_process_table() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(root: int, max_age: float = 0.0) -> list[int]:
    """``root`` and every process descended from it, from each process's parent in /proc, read now
    or (``max_age`` > 0) at most ``max_age`` seconds ago by any caller."""
    global _process_table
    with _process_table_lock:
        read_at, children = _process_table
        if max_age <= 0 or time.monotonic() - read_at > max_age:
            read_at = time.monotonic()
            children = _read_process_table()
            _process_table = (read_at, children)
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


#: The longest a running pod's worker sleeps without news: a safety net, not how changes arrive
#: (a process exit, a change of the Pod, a control or a timer wakes it).
IDLE_WAIT_S = 1.0
#: How often a worker looks again when it cannot be woken (no pidfd, a status report to retry).
POLL_S = 0.1


class ExitWatcher:
    """Wakes a pod's worker when one of its processes exits: one thread polls a pidfd per process
    (``pidfd_open``), so that hundreds of workers wait for news instead of polling ``waitpid``.
    The worker still reaps its processes itself (``Popen.poll``)."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.lock = threading.Lock()
        threading.Thread(target=self.run, name="exit-watcher", daemon=True).start()

    def watch(self, pid: int, wake: threading.Event) -> bool:
        """Set ``wake`` once ``pid`` (a child not reaped yet) exits; False if that cannot be watched."""
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            return False
        with self.lock:
            self.selector.register(fd, selectors.EVENT_READ, wake)
        return True

    def run(self) -> None:
        while True:
            # the kernel's epoll sees a pidfd registered while it waits: the timeout is only a bound
            for key, _ in self.selector.select(timeout=IDLE_WAIT_S):
                with self.lock:
                    self.selector.unregister(key.fd)
                os.close(key.fd)
                key.data.set()


class Container:
    """One container's process and its reported state."""

    def __init__(self, spec: dict[str, Any], init: bool, waiting_reason: str = "ContainerCreating") -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.init = init
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at: str | None = None
        self.restart_count = 0
        self.state: dict[str, Any] = {"waiting": {"reason": waiting_reason}}
        self.last_state: dict[str, Any] = {}
        self.restart_at: float | None = None  # monotonic time of a pending restart (back-off)
        self.started_mono = 0.0
        # probe kind -> {"next": monotonic time, "failures": n, "successes": n}; reset at each start
        self.probes: dict[str, dict[str, float]] = {}
        self.probed_ready = "readinessProbe" not in spec  # no probe: Ready as soon as it runs
        self.runs: list[LogRun] = []  # one per start, oldest first (``previous`` is the one before last)
        self.exit_watched = False  # the agent's ExitWatcher wakes the pod's worker when this run exits

    @property
    def ready(self) -> bool:
        return self.running and not self.init and self.probed_ready

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def terminated(self) -> dict[str, Any] | None:
        return self.state.get("terminated")

    def status(self, pod_uid: str) -> dict[str, Any]:
        image = self.spec.get("image", "")
        status = {
            "name": self.name,
            "image": image,
            "imageID": f"testbed://{image}",
            "ready": self.ready,
            "started": self.running,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.process is not None:
            status["containerID"] = f"testbed://{pod_uid}/{self.name}/{self.process.pid}"
        return status


class PodWorker(threading.Thread):
    """Runs one pod from preparation to removal, reporting its status like a kubelet."""

    def __init__(self, agent: Agent, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.uid: str = meta["uid"]
        self.ns: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.node: str = pod["spec"]["nodeName"]
        self.dir = agent.state_dir / "pods" / self.ns / self.pod_name / self.uid
        self.restart_policy: str = pod["spec"].get("restartPolicy", "Always")
        # a kubelet's default waiting reason for every container of a pod that has init containers
        init_specs = pod["spec"].get("initContainers") or []
        self.default_waiting = "PodInitializing" if init_specs else "ContainerCreating"
        self.init_containers = [Container(c, True, self.default_waiting) for c in init_specs]
        self.containers = [Container(c, False, self.default_waiting) for c in pod["spec"]["containers"]]
        self.pod_ip = ""
        self.host_ip = agent.nodes[self.node].ip
        self.hostname = (pod["spec"].get("hostname") or self.pod_name)[:63]
        self.phase = "Pending"
        self.start_time = now()
        self.started = time.monotonic()  # for spec.activeDeadlineSeconds, counted from startTime
        self.reason: str | None = None  # status.reason / status.message of a pod the agent failed
        self.message: str | None = None
        self.conditions: dict[str, dict[str, Any]] = {}
        self.volumes: dict[str, Path] = {}
        self.gone = threading.Event()  # the Pod object no longer exists
        self.kill_requested = threading.Event()
        # set by whatever may change what the worker does next (a process exit, the Pod changed or
        # deleted, a control); the worker waits on it between rounds (next_wait)
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.last_reported: Any = None
        self.report_failed = False
        self.initialized = not self.init_containers
        self.prepared = False
        self.finalized = False

    # -- events from the watcher and the controls
    def update(self, pod: dict[str, Any]) -> None:
        with self.lock:
            self.pod = pod
        self.wake.set()

    def remove(self) -> None:
        """The Pod object is gone from the API server."""
        self.gone.set()
        self.wake.set()

    @property
    def deletion_grace(self) -> int | None:
        meta = self.pod["metadata"]
        if not meta.get("deletionTimestamp"):
            return None
        return int(meta.get("deletionGracePeriodSeconds") or 0)

    def kill_and_record(self, procs: list[Container]) -> None:
        """SIGKILL every process of the pod, wait for ``procs`` and record the exit of each that
        was still running (never restarted)."""
        self.signal_all(signal.SIGKILL)
        for container in procs:
            if container.process is not None:
                code = container.process.wait()
                if "running" in container.state:
                    self.record_exit(container, code, allow_restart=False)

    def signal_all(self, sig: int) -> list[int]:
        """Send ``sig`` to every process of every running container; returns their main pids.

        Every process: the container's process group and any descendant that left it (a launcher
        such as msrun starting its workers in sessions of their own), as a kubelet reaches every
        process in the container's cgroup. The tree is read before any signal (at most
        ``PROCESS_TABLE_MAX_AGE_S`` before), so a child whose parent dies first is not lost. A
        stopped (paused) process keeps a SIGTERM pending without acting on it; SIGKILL ends it."""
        signalled = []
        for container in self.init_containers + self.containers:
            if container.running and container.process is not None:
                pid = container.process.pid
                tree = process_tree(pid, PROCESS_TABLE_MAX_AGE_S)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, sig)
                    signalled.append(pid)
                for other in tree:
                    if other != pid:
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(other, sig)
        return signalled

    def paused_containers(self) -> list[str]:
        """Containers whose main process is stopped by a signal (state ``T``): ``pause_pod``'s doing."""
        return [
            c.name
            for c in self.init_containers + self.containers
            if c.running and c.process is not None and process_state(c.process.pid) == "T"
        ]

    def held(self) -> bool:
        """A hold matches this pod and none of its containers has started: it must not start yet."""
        started = any(c.process is not None for c in self.init_containers + self.containers)
        return not started and self.agent.hold_for(self.pod) is not None

    def lost(self) -> bool:
        return self.agent.nodes[self.node].lost

    # -- the pod's life
    def run(self) -> None:
        try:
            self.live()
        except Exception as error:  # a testbed bug: say so in the pod's status rather than hang
            LOG.exception("pod %s/%s: worker failed", self.ns, self.pod_name)
            self.signal_all(signal.SIGKILL)
            for container in self.init_containers + self.containers:
                if not container.terminated:
                    message = f"node agent error: {error!r}"
                    container.state = {
                        "terminated": {"exitCode": 128, "reason": "StartError", "message": message}
                    }
            self.phase = "Failed"
            with contextlib.suppress(Exception):
                self.report()
            self.gone.wait()  # keep the IP and files until the pod is deleted
        finally:
            self.signal_all(signal.SIGKILL)
            self.agent.forget(self)

    def live(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pod_ip = self.agent.allocate_ip()
        self.report()
        while not self.prepared:
            if self.gone.is_set():
                return
            if self.deletion_grace is not None and not self.lost():
                self.finish_deletion()
                return
            if not self.lost():
                if self.past_active_deadline():
                    self.fail_active_deadline()
                    while not self.gone.is_set():  # a failed pod is still deleted gracefully
                        if self.deletion_grace is not None and not self.lost():
                            self.finish_deletion()
                            return
                        time.sleep(0.1)
                    return
                self.set_pending_conditions()
                if self.held():
                    # as a kubelet slow to mount a volume or pull an image shows it: no sandbox, no IP
                    self.set_waiting(self.default_waiting, None)
                    self.report()
                    time.sleep(0.2)
                    continue
                try:
                    self.prepare()
                    self.prepared = True
                    break
                except NotReadyYet as why:
                    self.set_waiting("ContainerCreating", str(why))
                except Exception as error:  # a volume or env the testbed cannot provide
                    LOG.exception("pod %s/%s: preparation failed", self.ns, self.pod_name)
                    self.set_waiting("CreateContainerConfigError", str(error))
                self.report()
            time.sleep(1)
        self.set_condition("PodReadyToStartContainers", True)
        if self.initialized:
            self.set_condition("Initialized", True)
        was_lost = False
        while not self.gone.is_set():
            self.wake.clear()  # before looking: news arriving from here on makes another round
            if self.lost():
                was_lost = True
                for container in self.init_containers + self.containers:
                    if container.process is not None:
                        container.process.poll()  # reap, but a powered-off node reports nothing
                time.sleep(0.1)
                continue
            if was_lost:
                was_lost = False
                self.after_power_on()
            if self.deletion_grace is not None:
                self.finish_deletion()
                return
            if self.kill_requested.is_set():
                self.kill_requested.clear()
                self.signal_all(signal.SIGKILL)
            if self.phase not in ("Succeeded", "Failed") and self.past_active_deadline():
                self.fail_active_deadline()
            self.step()
            self.report()
            self.wake.wait(self.next_wait())

    def next_wait(self) -> float:
        """Seconds until something due at a time needs this pod (a restart after back-off, a probe,
        the active deadline, a status report to retry, a process that cannot be watched), at most
        ``IDLE_WAIT_S``; news before then (``wake``) ends the wait early."""
        now_mono = time.monotonic()
        due = now_mono + IDLE_WAIT_S
        if self.report_failed or self.kill_requested.is_set():
            due = now_mono + POLL_S
        for container in self.init_containers + self.containers:
            if container.restart_at is not None:
                due = min(due, container.restart_at)
            if container.running:
                if not container.exit_watched:
                    due = min(due, now_mono + POLL_S)
                for state in container.probes.values():
                    due = min(due, state["next"])
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        if deadline is not None and self.phase not in ("Succeeded", "Failed"):
            due = min(due, self.started + int(deadline))
        return max(0.0, due - now_mono)

    def past_active_deadline(self) -> bool:
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        return deadline is not None and time.monotonic() - self.started >= int(deadline)

    def fail_active_deadline(self) -> None:
        """A pod active on the node past ``activeDeadlineSeconds`` (counted from its startTime,
        held or pending included): the kubelet kills it and fails it with reason DeadlineExceeded."""
        procs = [c for c in self.init_containers + self.containers if c.running]
        self.kill_and_record(procs)
        self.settle_container_states()
        self.phase = "Failed"
        self.reason = "DeadlineExceeded"
        self.message = "Pod was active on the node longer than the specified deadline"
        self.set_terminal_conditions()
        self.report()
        LOG.info("pod %s/%s: active deadline exceeded, killed", self.ns, self.pod_name)

    def prepare(self) -> None:
        """Materialise every volume (raises NotReadyYet while a referenced object is missing)."""
        for volume in self.pod["spec"].get("volumes") or []:
            self.volumes[volume["name"]] = self.agent.inputs.materialise_volume(self, volume)

    def step(self) -> None:
        """Start, reap and restart processes; compute the phase."""
        if self.phase in ("Succeeded", "Failed"):
            return
        if not self.initialized:
            for container in self.init_containers:
                if self.advance(container):
                    failed = container.terminated is not None and container.terminated["exitCode"] != 0
                    if failed and self.restart_policy == "Never":
                        self.phase = "Failed"
                        for main in self.containers:
                            main.state = {"waiting": {"reason": "PodInitializing"}}
                        return
                    continue
                return  # this init container is still running or waiting to restart
            self.initialized = True
            self.set_condition("Initialized", True)
        for container in self.containers:
            self.advance(container)
            if container.running:
                self.probe(container)
        if all(c.terminated and c.restart_at is None for c in self.containers):
            failed = any(c.terminated and c.terminated["exitCode"] != 0 for c in self.containers)
            self.phase = "Failed" if failed else "Succeeded"
            self.set_terminal_conditions()
        else:
            # As the kubelet's getPhase: a pod none of whose containers has started yet (each still
            # waiting, e.g. CreateContainerConfigError) is Pending, not Running; a container that
            # ran before and waits to restart counts as having run.
            started = any(
                c.running or c.terminated or c.last_state.get("terminated") for c in self.containers
            )
            self.phase = "Running" if started else "Pending"
            unready = [c.name for c in self.containers if not c.ready]
            message = f"containers with unready status: [{' '.join(unready)}]" if unready else None
            for kind in ("Ready", "ContainersReady"):
                self.set_condition(kind, not unready, "ContainersNotReady" if unready else None, message)

    def advance(self, container: Container) -> bool:
        """Drive one container; True once it has terminated for good (no restart coming)."""
        if container.process is None:
            if container.terminated:
                return True  # it could not run at all
            if container.restart_at is None or time.monotonic() >= container.restart_at:
                container.restart_at = None
                self.launch(container)
            return False
        if container.running:
            code = container.process.poll()
            if code is None:
                return False
            self.record_exit(container, code)
        if container.restart_at is not None:
            if time.monotonic() >= container.restart_at:
                container.restart_at = None  # record_exit kept the last run in last_state
                container.restart_count += 1
                self.launch(container)
            return False
        return True

    def probe(self, container: Container) -> None:
        """Readiness and liveness probes (httpGet, tcpSocket, exec) as the kubelet runs them."""
        for kind in ("readinessProbe", "livenessProbe"):
            spec = container.spec.get(kind)
            if not spec or (kind == "livenessProbe" and "startupProbe" in container.spec):
                continue  # startup probes are not run, so liveness (which waits for them) is not either
            state = container.probes.setdefault(
                kind,
                {
                    "next": container.started_mono + spec.get("initialDelaySeconds", 0),
                    "failures": 0,
                    "successes": 0,
                },
            )
            if time.monotonic() < state["next"]:
                continue
            state["next"] = time.monotonic() + spec.get("periodSeconds", 10)
            ok = self.run_probe(container, spec)
            state["failures"] = 0 if ok else state["failures"] + 1
            state["successes"] = state["successes"] + 1 if ok else 0
            if kind == "readinessProbe":
                if ok and state["successes"] >= spec.get("successThreshold", 1):
                    container.probed_ready = True
                elif not ok and state["failures"] >= spec.get("failureThreshold", 3):
                    container.probed_ready = False
            elif not ok and state["failures"] >= spec.get("failureThreshold", 3) and container.process:
                LOG.info("pod %s/%s container %s failed its liveness probe: killed", self.ns, self.pod_name,
                         container.name)  # fmt: skip
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(container.process.pid, signal.SIGKILL)

    def run_probe(self, container: Container, spec: dict[str, Any]) -> bool:
        timeout = float(spec.get("timeoutSeconds", 1))

        def port_number(port: Any) -> int:
            if isinstance(port, int) or str(port).isdigit():
                return int(port)
            for declared in container.spec.get("ports") or []:
                if declared.get("name") == port:
                    return int(declared["containerPort"])
            raise ValueError(f"no container port named {port!r}")

        try:
            if "httpGet" in spec:
                get = spec["httpGet"]
                scheme = get.get("scheme", "HTTP").lower()
                host, port = get.get("host") or self.pod_ip, port_number(get["port"])
                url = f"{scheme}://{host}:{port}{get.get('path', '/')}"
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                session = requests.Session()
                session.trust_env = False  # no proxies: the probe goes straight to the pod
                response = session.get(
                    url, headers=headers, timeout=timeout, verify=False, allow_redirects=False
                )
                return 200 <= response.status_code < 400
            if "tcpSocket" in spec:
                port = port_number(spec["tcpSocket"]["port"])
                with socket.create_connection(
                    (spec["tcpSocket"].get("host") or self.pod_ip, port), timeout=timeout
                ):
                    return True
            if "exec" in spec and container.process is not None:
                # inside the container's mount and UTS namespaces, with its environment
                argv = ["nsenter", "--target", str(container.process.pid), "--mount", "--uts", "--",
                        *spec["exec"]["command"]]  # fmt: skip
                env = self.agent.inputs.container_env(self, container.spec)
                done = subprocess.run(argv, env=env, capture_output=True, timeout=timeout, cwd="/")
                return done.returncode == 0
        except (OSError, ValueError, requests.RequestException, subprocess.TimeoutExpired, NotReadyYet):
            return False
        return True  # grpc and unknown probe kinds: not checked

    def record_exit(self, container: Container, code: int, allow_restart: bool = True) -> None:
        pid = container.process.pid if container.process else 0
        if container.runs:  # its output is in the log files before the exit is reported
            container.runs[-1].finish()
        exit_code = 128 - code if code < 0 else code  # killed by signal N: 128+N, as a runtime reports
        term: dict[str, Any] = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": container.started_at,
            "finishedAt": now(),
            "containerID": f"testbed://{self.uid}/{container.name}/{pid}",
        }
        if code < 0:
            term["signal"] = -code
        message = self.termination_message(container, exit_code)
        if message:
            term["message"] = message
        container.state = {"terminated": term}
        restart = self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and exit_code != 0)
        if container.init:
            restart = exit_code != 0 and self.restart_policy != "Never"
        if restart and allow_restart:
            backoff = min(10.0, 1.0 * 2**container.restart_count)
            container.restart_at = time.monotonic() + backoff
            container.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff" if exit_code else "Completed",
                    "message": f"back-off {backoff:g}s restarting {container.name}",
                }
            }
            container.last_state = {"terminated": term}
        LOG.info("pod %s/%s container %s exited %d", self.ns, self.pod_name, container.name, exit_code)

    def termination_message(self, container: Container, exit_code: int) -> str:
        path = self.dir / f"{container.name}.termination-log"
        try:
            message = path.read_bytes()[:4096].decode(errors="replace")
        except OSError:
            message = ""
        policy = container.spec.get("terminationMessagePolicy", "File")
        if not message and exit_code != 0 and policy == "FallbackToLogsOnError":
            try:
                lines = (self.dir / f"{container.name}.log").read_bytes()[-2048:].decode(errors="replace")
                message = "\n".join(lines.splitlines()[-80:])
            except OSError:
                pass
        return message

    def launch(self, container: Container) -> None:
        spec = container.spec
        command = list(spec.get("command") or []) + list(spec.get("args") or [])
        try:
            env = self.agent.inputs.container_env(self, spec)
        except NotReadyYet as why:
            container.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(why)}}
            container.restart_at = time.monotonic() + 1
            container.process = None  # a retry of this start, not one more restart (restartCount)
            return
        command = [expand(part, env) for part in command]
        if not command:
            container.state = {
                "terminated": {
                    "exitCode": 128,
                    "reason": "ContainerCannotRun",
                    "finishedAt": now(),
                    "message": "the testbed runs only containers with a command",
                }
            }
            container.process = None
            return
        termination_log = self.dir / f"{container.name}.termination-log"
        termination_log.write_bytes(b"")
        mounts: list[tuple[Path, str, bool]] = []
        for mount in spec.get("volumeMounts") or []:
            source = self.volumes.get(mount["name"])
            if source is None:
                container.state = {
                    "terminated": {
                        "exitCode": 128,
                        "reason": "StartError",
                        "finishedAt": now(),
                        "message": f"volumeMount {mount['name']!r} names no volume",
                    }
                }
                return
            if mount.get("subPath"):
                source = source / mount["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            mounts.append((source, mount["mountPath"], bool(mount.get("readOnly"))))
        mounts.append((termination_log, spec.get("terminationMessagePath") or "/dev/termination-log", False))
        workdir = spec.get("workingDir") or "/"
        try:
            argv = self.agent.wrap(self, command, mounts, workdir)
        except ValueError as error:
            container.state = {
                "terminated": {
                    "exitCode": 128,
                    "reason": "StartError",
                    "finishedAt": now(),
                    "message": str(error),
                }
            }
            return
        # stdout and stderr share one pipe (one stream, in order); the run's reader timestamps each line
        read_fd, write_fd = os.pipe()
        try:
            container.process = subprocess.Popen(
                argv,
                stdout=write_fd,
                stderr=write_fd,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                cwd="/",
            )
        except OSError as error:
            os.close(read_fd)
            container.state = {
                "terminated": {
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": str(error),
                    "finishedAt": now(),
                }
            }
            return
        finally:
            os.close(write_fd)
        run = LogRun(
            self.dir / "containers" / container.name / f"{container.restart_count}.log",
            self.dir / f"{container.name}.log",
        )
        run.start(read_fd, f"{self.ns}/{self.pod_name}/{container.name}")
        container.runs.append(run)
        container.exit_watched = self.agent.exits.watch(container.process.pid, self.wake)
        container.started_at = now()
        container.started_mono = time.monotonic()
        container.probes = {}
        container.probed_ready = "readinessProbe" not in spec
        container.state = {"running": {"startedAt": container.started_at}}
        LOG.info(
            "pod %s/%s container %s started: pid %d",
            self.ns,
            self.pod_name,
            container.name,
            container.process.pid,
        )

    def after_power_on(self) -> None:
        """The node came back: what ran on it was killed when it lost power."""
        for container in self.init_containers + self.containers:
            if container.process is not None and "running" in container.state:
                code = container.process.poll()
                self.record_exit(container, code if code is not None else -signal.SIGKILL)

    def finish_deletion(self) -> None:
        """Graceful deletion: SIGTERM, wait the grace period, SIGKILL, report, delete with grace 0."""
        grace = self.deletion_grace or 0
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        procs = [c for c in self.init_containers + self.containers if c.running]
        while time.monotonic() < deadline and any(c.process and c.process.poll() is None for c in procs):
            if self.gone.is_set() or self.lost():
                break
            time.sleep(0.05)
        self.kill_and_record(procs)
        if self.lost():
            return  # a node that lost power mid-deletion reports nothing; after restore the pod is re-handled
        self.settle_container_states()
        if self.phase not in ("Succeeded", "Failed"):
            # a kubelet gives every pod it terminates a terminal phase, also one whose containers never ran
            failed = any(c.terminated and c.terminated["exitCode"] != 0 for c in self.containers)
            self.phase = "Failed" if failed or not all(c.terminated for c in self.containers) else "Succeeded"
        self.set_terminal_conditions()
        self.report()
        self.agent.finalize_delete(self.ns, self.pod_name, self.uid)
        self.gone.wait(30)

    def settle_container_states(self) -> None:
        """The container states a kubelet reports for a pod it has terminated (its status manager's
        ``TerminatePod``): a container waiting to restart shows its last run; one that never ran shows
        ``ContainerStatusUnknown`` (exit 137) -- regular containers only once the pod has initialized,
        init containers up to the last one that was attempted (else the first)."""
        unknown = {
            "exitCode": 137,
            "reason": "ContainerStatusUnknown",
            "message": "The container could not be located when the pod was terminated",
        }

        def settle(container: Container) -> None:
            if container.terminated:
                return
            last = container.last_state.get("terminated")
            container.state = {"terminated": dict(last or unknown)}
            container.restart_at = None

        def attempted(container: Container) -> bool:
            return container.process is not None or bool(container.last_state)

        if not self.init_containers or self.initialized or any(attempted(c) for c in self.containers):
            for container in self.containers:
                settle(container)
        tried = [i for i, c in enumerate(self.init_containers) if attempted(c)]
        for container in self.init_containers[: (tried[-1] if tried else 0) + 1]:
            settle(container)

    def set_terminal_conditions(self) -> None:
        reason = "PodFailed" if self.phase == "Failed" else "PodCompleted"
        self.set_condition("Ready", False, reason)
        self.set_condition("ContainersReady", False, reason)

    # -- status
    def set_waiting(self, reason: str, message: str | None) -> None:
        for container in self.init_containers + self.containers:
            if container.process is None:
                waiting = {"reason": reason} if message is None else {"reason": reason, "message": message}
                container.state = {"waiting": waiting}

    def set_pending_conditions(self) -> None:
        """The kubelet's conditions for a pod whose containers have not started (no sandbox yet)."""
        self.set_condition("PodReadyToStartContainers", False)
        if self.init_containers:
            names = "[" + " ".join(c.name for c in self.init_containers) + "]"
            self.set_condition(
                "Initialized",
                False,
                "ContainersNotInitialized",
                f"containers with incomplete status: {names}",
            )
        else:
            self.set_condition("Initialized", True)
        names = "[" + " ".join(c.name for c in self.containers) + "]"
        for kind in ("Ready", "ContainersReady"):
            self.set_condition(kind, False, "ContainersNotReady", f"containers with unready status: {names}")

    def set_condition(
        self, kind: str, value: bool, reason: str | None = None, message: str | None = None
    ) -> None:
        status = "True" if value else "False"
        old = self.conditions.get(kind)
        wanted = (status, reason, message)
        if old is not None and (old["status"], old.get("reason"), old.get("message")) == wanted:
            return
        condition: dict[str, Any] = {
            "type": kind,
            "status": status,
            "lastProbeTime": None,
            # as a kubelet: the transition time moves only when the status does
            "lastTransitionTime": old["lastTransitionTime"] if old and old["status"] == status else now(),
        }
        if reason:
            condition["reason"] = reason
        if message:
            condition["message"] = message
        self.conditions[kind] = condition

    def report(self) -> None:
        if self.lost() or self.gone.is_set():
            return
        status: dict[str, Any] = {
            "phase": self.phase,
            "hostIP": self.host_ip,
            "hostIPs": [{"ip": self.host_ip}],
            "startTime": self.start_time,
            "conditions": list(self.conditions.values()),
            "containerStatuses": [c.status(self.uid) for c in self.containers],
        }
        if self.init_containers:
            status["initContainerStatuses"] = [c.status(self.uid) for c in self.init_containers]
        if self.reason:
            status["reason"] = self.reason
            status["message"] = self.message
        if self.prepared:
            status["podIP"] = self.pod_ip
            status["podIPs"] = [{"ip": self.pod_ip}]
        if status == self.last_reported:
            return
        self.report_failed = True  # until the API server took it: the worker tries again soon
        try:
            self.agent.kube.patch(pod_path(self.ns, self.pod_name) + "/status", {"status": status})
            self.last_reported = status
            self.report_failed = False
            self.agent.hosts_dirty.set()
        except KubeError as error:
            if error.status == 404:
                self.remove()
            else:
                LOG.warning("pod %s/%s: status update failed: %s", self.ns, self.pod_name, error)
        except requests.RequestException as error:
            LOG.warning("pod %s/%s: status update failed: %s", self.ns, self.pod_name, error)

    def describe(self) -> dict[str, Any]:
        return {
            "namespace": self.ns,
            "name": self.pod_name,
            "uid": self.uid,
            "node": self.node,
            "phase": self.phase,
            "podIP": self.pod_ip,
            "dir": str(self.dir),
            "pids": {c.name: c.process.pid for c in self.containers if c.running and c.process},
            "paused": self.paused_containers(),
            "held": self.held(),
        }
