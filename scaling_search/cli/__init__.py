"""The ``scaling-search`` command: one module per group of subcommands."""
