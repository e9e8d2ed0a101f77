"""A demo trainer that behaves like a MindSpore Transformers job, in numpy, on CPUs.

A two-layer MLP regression model is trained data- and tensor-parallel across ranks that talk
over TCP (``comm``); it reads the MindFormers-style YAML (``config``), writes Checkpoint 1.0
files and strategy files and resumes from exactly what the config says (``checkpoint``); with a
``checkpoint:`` section in the YAML it saves and resumes Checkpoint 2.0 iterations instead
(``checkpoint2``), as MindFormers 2.1 does. The
training loop lives in ``train``, the command line and the per-worker launcher in ``main``.
Run it as ``python -m examples.trainer --config train.yaml`` with the repository root on
``PYTHONPATH`` (or as the working directory), or as ``python examples/trainer/main.py``.
"""
