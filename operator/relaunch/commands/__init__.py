"""Sub-commands of the ``relaunch`` CLI, one module each (see ``relaunch.cli``)."""
