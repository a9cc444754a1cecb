"""Ray Tune, and only here: the stages of one run, driven from one process."""
