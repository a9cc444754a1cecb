"""The recipe without Ray: typed trial specs, the sweep planner, trial bodies, input checks."""
