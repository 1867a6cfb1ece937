"""``python -m scaling_search.cli``: the ``scaling-search`` command."""

from scaling_search.cli.main import main

raise SystemExit(main())
