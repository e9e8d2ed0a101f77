"""What every part of the node agent shares: its logger, the testbed's fixed settings, times."""

from __future__ import annotations

import datetime as dt
import logging

LOG = logging.getLogger("nodeagent")
LOG_FORMAT = "%(asctime)s %(levelname)s %(threadName)s: %(message)s"
#: Host environment every pod process inherits (machine-level library settings, not the agent's).
MACHINE_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
POD_MARKER_ENV = "RELAUNCH_TESTBED_CLUSTER"
STORAGE_CLASS = "testbed"
PROVISIONER = "relaunch.dev/testbed-hostpath"
KUBELET_VERSION = "v1.37.2"
LEASE_RENEW_S = 2.0
NODE_STATUS_S = 10.0
NODE_CPU = "32"
NODE_MEMORY = "128Gi"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Conflict(Exception):
    """A control that cannot apply to the pod as it is now (HTTP 409)."""


class NotReadyYet(Exception):
    """Something the pod needs does not exist yet (a ConfigMap, a bound PVC): retry later."""
