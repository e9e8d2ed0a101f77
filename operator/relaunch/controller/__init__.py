"""The TrainingJob controller.

- :mod:`relaunch.controller.reconcile` — the pure state machine: (spec, status, what the cluster
  shows, now) -> (actions, new status, events). All decisions live there.
- :mod:`relaunch.controller.planning` — the bridge to :mod:`relaunch.plan` and
  :mod:`relaunch.config` (the planning Job's command, reading its result, rendering the config).
- :mod:`relaunch.controller.kube` — I/O: observing pods, Jobs and nodes, applying actions
  idempotently (409/404 mean "already done"), status patches and Events.
- :mod:`relaunch.controller.metrics` — Prometheus metrics.
- :mod:`relaunch.controller.loops` — the registry of per-TrainingJob loops (asyncio tasks of the
  operator process; no kopf daemon, hence no finalizer on the jobs).
- :mod:`relaunch.controller.handlers` — the kopf wiring: settings, each TrainingJob's loop, and
  the watch handlers that start, wake and stop it.
"""
