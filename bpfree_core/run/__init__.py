"""A run: the epoch loop (trainer) over an Executor, its run directory (rundir, checkpoint),
its record keeping (runlog, callbacks, clock) and its reruns after a stage failure (restarts)."""
