"""More than one process on a study: worker processes on this machine and SLURM array tasks, each handed the launch."""
