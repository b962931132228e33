"""Stopping cleanly when the scheduler asks: finish the step, checkpoint, come back if the job should.

Signals (every rank receives them from srun):
- USR1: the pre-timeout signal our sbatch scripts ask for (``--signal=USR1@300``); with
  ``SlurmctldParameters=preempt_send_user_signal`` also sent at preemption. The run checkpoints and rank 0 requeues
  the job (``scontrol requeue $SLURM_JOB_ID``; for an array element that is the element's own id).
- USR2: submitit's pre-timeout/preemption signal (Hydra's submitit launcher). The run checkpoints, then hands the
  signal to submitit's own handler, which requeues the job with its pickled submission.
- SIGTERM: cancellation (scancel), a requeue by someone else, or preemption's kill. The run checkpoints and exits
  without requeueing: a cancelled job must stay cancelled, and Slurm itself requeues jobs it preempts when the
  partition has ``PreemptMode=REQUEUE`` (or that were requeued with scontrol).

Ranks may see a signal at different steps, so the decision to stop is all-reduced in every step, in the same
reduction as the step's finiteness verdict (engine/trainer.py): all ranks stop after the same step (the one whose
verdict first carried the signal) and write the same checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch
import torch.distributed as dist

from .log import say
from .distributed import barrier
from .errors import Stopped

# Priority when ranks saw different signals: a requeue request wins over a plain stop.
PRIORITY = {signal.SIGTERM: 1, signal.SIGUSR1: 2, signal.SIGUSR2: 3}
BY_PRIORITY = {v: k for k, v in PRIORITY.items()}


class StopSignals:
    def __init__(self, device: torch.device, is_main: bool, log=None, group=None):
        self.device, self.is_main, self.log = device, is_main, log  # log: the run's RunLog, for train.log
        self.group = group  # the barrier's group: rank 0 may still be writing (DistInfo.save_group)
        self.received = 0  # PRIORITY of the strongest signal seen by this rank
        self.previous = {}
        for sig in PRIORITY:
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals to whoever owns them
                pass

    def _handler(self, signum, frame):
        if not self.received:
            line = f"received {signal.Signals(signum).name}: checkpointing after this step"
            say(line)
            if self.log is not None:
                self.log(line, console=False)
        self.received = max(self.received, PRIORITY[signum])

    @staticmethod
    def signal(level: int) -> signal.Signals | None:
        """The signal a stop level stands for (the level all ranks reduced to), or None to go on."""
        return BY_PRIORITY.get(level)

    def requested(self) -> signal.Signals | None:
        """The signal all ranks stop on, or None to go on. Collective under torch.distributed."""
        level = self.received
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([level], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            level = int(t.item())
        return BY_PRIORITY.get(level)

    def finish(self, sig: signal.Signals) -> Stopped:
        """After the checkpoint: requeue if the signal asks for it; returns the exception that ends the run.

        Collective. Rank 0 alone writes a single-file checkpoint and asks for the requeue; a rank that exited before
        it was done would make srun (--kill-on-bad-exit) kill rank 0 halfway through. So every rank waits at a
        barrier until rank 0 has written and requeued, and only then do all of them exit."""
        note = "not requeued"
        previous = self.previous.get(sig)
        submitit = sig != signal.SIGTERM and callable(previous)
        if sig != signal.SIGTERM and not submitit and os.environ.get("SLURM_JOB_ID"):
            note = requeue(os.environ["SLURM_JOB_ID"]) if self.is_main else "rank 0 requeues"
        barrier(self.device, self.group)
        if submitit:
            previous(sig, None)  # submitit's handler: requeues the job and exits the process
        return Stopped(f"stopped by {sig.name} after checkpointing ({note})", 128 + sig)


def requeue(job_id: str) -> str:
    res = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    return f"requeued job {job_id}" if res.returncode == 0 else f"scontrol requeue {job_id} failed: {res.stderr.strip()}"


def requeue_on_timeout_signal(is_main: bool):
    """For jobs with nothing to save (eval.py): on USR1, rank 0 requeues the job and every rank exits; the restarted
    job starts again."""
    def handler(signum, frame):
        job = os.environ.get("SLURM_JOB_ID")
        note = requeue(job) if job and is_main else "not requeued"
        say(f"received {signal.Signals(signum).name}: exiting ({note})")
        sys.exit(128 + signum)
    try:
        signal.signal(signal.SIGUSR1, handler)
    except ValueError:  # not the main thread
        pass
