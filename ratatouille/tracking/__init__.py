"""MLflow, and only here: experiment, parent run, child run per trial, reducer run."""
