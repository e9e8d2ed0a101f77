"""``python -m e2e.nodeagent``: run the node agent."""

from e2e.nodeagent.agent import main

raise SystemExit(main())
