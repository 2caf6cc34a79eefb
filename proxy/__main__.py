"""`python -m proxy` is the `llm-proxy` command."""

from .cli import main

raise SystemExit(main())
