"""``python -m e2e.nodeagent``: run the node agent."""

from e2e.nodeagent.agent import main

if __name__ == "__main__":  # not when the heartbeat process (spawned) imports it
    raise SystemExit(main())
