"""relaunch: keeps distributed training jobs alive on Kubernetes.

The package is laid out so that decisions are pure functions (``checkpoints``, ``strategy``,
``config``, ``plan``, ``resources``) and I/O lives at the edges (``controller``, ``cli``,
``convert``'s file writers).
"""

__version__ = "0.1.0"
