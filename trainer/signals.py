"""Process exit codes the launchers act on."""

# The trainer saved a checkpoint because it was asked to stop (SIGTERM / SIGUSR1) and expects
# to be started again: slurm/train.sbatch requeues the job on this code and on no other.
EXIT_REQUEUE = 85
