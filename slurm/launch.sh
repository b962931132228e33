#!/bin/bash
# Run inside an allocation by our sbatch scripts: `bash slurm/launch.sh train.py|eval.py [Hydra overrides]`.
# srun starts one task per GPU; each finds its rank in SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS and the
# rendezvous in the allocation's first node (src/mambavision_train/distributed.py). The job runs from the
# directory sbatch was called in (the repository root), or from $MV_ROOT.
# When srun returns, the task that ended first decides (one "[launch]" line each): 0 done; 2 the run failed by itself
# (bad config, data, NaN): not requeued; 138/140 stopped by USR1/USR2 after a checkpoint, already requeued by the run
# or submitit; 143 SIGTERM (cancelled): not requeued; anything else (75: a peer rank died or hung; a task killed by
# the OOM killer, a segfault, ...) is a rank failure: the job requeues itself and resumes, at most MAX_FAILURES times
# (default 3, counted in the job's Comment as rank_failures=N), then stops with a line. docs/slurm.md.
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
# srun's own status is its tasks' highest, and --kill-on-bad-exit ends the other tasks with SIGTERM (143): a task
# killed by the OOM killer and a run that failed by itself would both read as a cancellation. Its lines on stderr
# ("srun: error: <node>: task 1: Killed") name each task's end as it comes: the first is the cause.
srun_log=$(mktemp "${TMPDIR:-/tmp}/mv-launch.XXXXXX")
trap 'rm -f "$srun_log"' EXIT
# scancel and a requeue send SIGTERM to every process of the job, this script and tee too, while the ranks still
# checkpoint and say why they stopped: tee ignores it (or their last lines would be lost with the pipe) and this
# script waits for srun, to say what it decided.
trap ':' TERM
status=0
{ srun --kill-on-bad-exit=1 --cpus-per-task="$cpus" "$PYTHON" "$@" 2>&1 1>&3 3>&- |
    (trap '' TERM; exec tee "$srun_log" >&2); } 3>&1 || status=$?
task="" code=$status
if [ "$status" -ne 0 ] && first=$(grep -m1 -E '^srun: error: [^ ]+: tasks? [0-9,-]+: ' "$srun_log"); then
    task=${first#*: task}; task=${task#s}; task=${task%%:*}; task="task${task}"
    case ${first##*: } in  # 128 + the signal for a task killed by one, as a shell reports it
        "Exited with exit code "*) code=${first##* } ;;
        Killed) code=137 ;;
        Segmentation\ fault*) code=139 ;;
        Aborted*) code=134 ;;
        Bus\ error*) code=135 ;;
        Terminated) code=143 ;;
    esac
fi

# One line starting "[launch]" for every decision; the script exits with the status of the task that ended first.
say() { echo "[launch] $*"; }
case $code in
    0) say "done (exit 0)"; exit 0 ;;
    2) say "the run failed by itself ($task exit 2): not requeued; fix what the error line above names, then" \
           "submit the same command again (it resumes from the last checkpoint)"; exit 2 ;;
    138) say "stopped by USR1 after a checkpoint (exit 138): the run requeued the job itself"; exit 138 ;;
    140) say "stopped by USR2 after a checkpoint (exit 140): submitit requeues the job"; exit 140 ;;
    143) say "stopped by SIGTERM ($task exit 143): not requeued (cancelled, or Slurm requeues it itself)"; exit 143 ;;
esac
if [ "$code" -eq 75 ]; then what="a peer rank died or hung ($task exit 75)"; else what="$task failed (exit $code)"; fi
job=${SLURM_JOB_ID:-}  # an array element's own id: requeueing it leaves the other elements alone
if [ -z "$job" ]; then say "$what: not under Slurm, nothing to requeue"; exit "$code"; fi
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
    exit "$code"
fi
scontrol update JobId="$job" Comment="$comment" ||
    say "warning: could not record the failure count in job $job's Comment: it may requeue more than MAX_FAILURES times"
# Said before the requeue: it ends this script too.
say "$what: requeued, failure $failures of $max (the job resumes from the last checkpoint)"
scontrol requeue "$job" ||
    say "scontrol requeue $job failed: not requeued; submit the same command again: it resumes from the last checkpoint"
exit "$code"
