#!/bin/bash
# Run inside an allocation by our sbatch scripts: `bash slurm/launch.sh train.py|eval.py [Hydra overrides]`.
# srun starts one task per GPU; each finds its rank in SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS and the
# rendezvous in the allocation's first node (src/mambavision_train/distributed.py). The job runs from the
# directory sbatch was called in (the repository root), or from $MV_ROOT.
set -euo pipefail
cd "${MV_ROOT:-${SLURM_SUBMIT_DIR:-.}}"
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
echo "[$(date -Is)] job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}:" \
     "${SLURM_NTASKS:-1} tasks: $PYTHON $*"
srun --kill-on-bad-exit=1 "$PYTHON" "$@"
