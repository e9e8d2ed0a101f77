"""``python -m examples.trainer``: run the demo trainer (see ``examples.trainer.main``)."""

from examples.trainer.main import main

raise SystemExit(main())
