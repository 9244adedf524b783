"""`python -m planner`: the command line, one module per group of subcommands (commands: the parser, table,
breakdown and verify; bench; budget: solve and plan; cost: run and serve). Every subcommand calls the
planner's API, as the app does; the app imports nothing from here."""

from planner.cli.commands import main

__all__ = ["main"]
