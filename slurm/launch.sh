#!/bin/bash
# Run inside an allocation by our sbatch scripts: `bash slurm/launch.sh train.py|eval.py [Hydra overrides]`.
# srun starts one task per GPU; each finds its rank in SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS and the
# rendezvous in the allocation's first node (src/mambavision_train/distributed.py). The job runs from the
# directory sbatch was called in (the repository root), or from $MV_ROOT.
set -euo pipefail
cd "${MV_ROOT:-${SLURM_SUBMIT_DIR:-.}}"
source slurm/environment.sh
# Each task gets the allocation's --cpus-per-task, said to srun: Slurm's 22.05 release notes have srun no longer
# read it from sbatch ("srun will no longer read in SLURM_CPUS_PER_TASK"), and where a site binds tasks to cores
# every rank would then run its loader threads or workers and itself on one core.
cpus=${SLURM_CPUS_PER_TASK:-1}
# The training process's own CPU threads: one per GPU task (the cores are the loader's; spinning OpenMP threads would
# take them, as torchrun's default of 1 avoids), every CPU of the task when it trains on CPUs.
if [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ]; then threads=1; else threads=$cpus; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
echo "[$(date -Is)] job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}:" \
     "${SLURM_NTASKS:-1} tasks x $cpus CPUs: $PYTHON $*"
# The request, its data and its output folders checked once, on this host, before srun starts every rank: a mistake
# is one line in the job's log. A requeued job passed it already.
# (paper_table.sbatch checks its whole job first and says so with MV_CHECKED=1.)
if [[ "${1:-}" == *.py ]] && [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ] && [ -z "${MV_CHECKED:-}" ]; then
    "$PYTHON" "$@" dry_run=true
fi
srun --kill-on-bad-exit=1 --cpus-per-task="$cpus" "$PYTHON" "$@"
