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
status=0
srun --kill-on-bad-exit=1 --cpus-per-task="$cpus" "$PYTHON" "$@" || status=$?

# What srun's status says (its highest task status; 128 + N for a task killed by signal N) and what follows. Every
# decision is one line starting "[launch]".
say() { echo "[launch] $*"; }
case $status in
    0) say "done (exit 0)"; exit 0 ;;
    2) say "the run failed by itself (exit 2): not requeued; fix what the error line above names, then submit" \
           "the same command again (it resumes from the last checkpoint)"; exit 2 ;;
    138) say "stopped by USR1 after a checkpoint (exit 138): the run requeued the job itself"; exit 138 ;;
    140) say "stopped by USR2 after a checkpoint (exit 140): submitit requeues the job"; exit 140 ;;
    143) say "stopped by SIGTERM after a checkpoint (exit 143): not requeued (cancelled, or Slurm requeues it" \
             "itself)"; exit 143 ;;
esac
if [ "$status" -eq 75 ]; then what="a peer rank died or hung (exit 75)"; else what="task failure (exit $status)"; fi
job=${SLURM_JOB_ID:-}  # an array element's own id: requeueing it leaves the other elements alone
if [ -z "$job" ]; then say "$what: not under Slurm, nothing to requeue"; exit "$status"; fi
max=${MAX_FAILURES:-3}
# The count of rank failures survives requeues in the job's Comment (SLURM_RESTART_COUNT counts preemptions and
# time-limit requeues too); any other text of the comment is kept.
comment=$(squeue -h -j "$job" -o %k 2>/dev/null || true)
[ "$comment" = "(null)" ] && comment=""
failures=$(sed -n 's/.*rank_failures=\([0-9]*\).*/\1/p' <<< "$comment")
failures=$(( ${failures:-0} + 1 ))
comment=$(sed 's/ *rank_failures=[0-9]*//' <<< "$comment")
comment="${comment:+$comment }rank_failures=$failures"
if [ "$failures" -gt "$max" ]; then
    say "$what: failure $failures with MAX_FAILURES=$max: not requeued; the first error above says what failed;" \
        "fix it (or raise MAX_FAILURES) and submit the same command again: it resumes from the last checkpoint"
    exit "$status"
fi
scontrol update JobId="$job" Comment="$comment" ||
    say "warning: could not record the failure count in job $job's Comment: it may requeue more than MAX_FAILURES times"
# Said before the requeue: it ends this script too.
say "$what: requeued, failure $failures of $max (the job resumes from the last checkpoint)"
scontrol requeue "$job" ||
    say "scontrol requeue $job failed: not requeued; submit the same command again: it resumes from the last checkpoint"
exit "$status"
