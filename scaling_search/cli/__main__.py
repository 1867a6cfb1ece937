"""``python -m scaling_search.cli``: the ``scaling-search`` command."""

from scaling_search.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
