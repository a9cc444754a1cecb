"""The `ratatouille` command: run, plan, reduce, report and pool."""
