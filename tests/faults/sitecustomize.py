"""Fault injection for the tests. Python imports this module at start-up when tests/faults is on PYTHONPATH (the
tests put it there with `faults(...)` from tests/runs.py); the package knows nothing about it.

Each fault is an environment variable:
  MV_FAULT_KILL_AT_STEP=N        every rank SIGKILLs itself right after the checkpoint written at global step N
  MV_FAULT_NAN=RANK:STEP[:grad]  at global step STEP (1-based), rank RANK's loss is NaN; with ':grad' the loss stays
                                 finite and its gradient is inf instead
  MV_FAULT_SLOW_SAVE=SECONDS     rank 0 waits this long inside every checkpoint save, before writing
  MV_FAULT_HOLD_AT_STEPS=N[,M..] after logging global step N, each rank waits (at most 2 minutes) until it receives
                                 a stop signal, which the next step's verdict carries to every rank: the run stops
                                 after step N + 1, so a test signals a run at a known step without racing it
  MV_FAULT_ONLY_WHERE=VAR=VALUE  inject the faults only in processes whose environment has VAR=VALUE (one element
                                 of an array job: SLURM_ARRAY_TASK_ID=0)
"""

import os

_where = os.environ.get("MV_FAULT_ONLY_WHERE", "=").split("=", 1)
if any(k.startswith("MV_FAULT_") for k in os.environ) and os.environ.get(_where[0], "") == _where[1]:
    import signal
    import time

    import torch

    from mambavision_train.checkpoint import store
    from mambavision_train.engine.trainer import Trainer

    class _InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("inf")

    if "MV_FAULT_NAN" in os.environ:
        rank, step, *kind = os.environ["MV_FAULT_NAN"].split(":")
        train_step = Trainer.train_step

        def faulty_step(self, batches):
            if not (self.dist.rank == int(rank) and self.state.global_step + 1 == int(step)):
                return train_step(self, batches)
            loss = self.loss
            if kind == ["grad"]:
                self.loss = lambda logits, target, images: loss(_InfGrad.apply(logits), target, images)
            else:
                self.loss = lambda logits, target, images: loss(logits, target, images) * float("nan")
            try:
                return train_step(self, batches)
            finally:
                self.loss = loss

        Trainer.train_step = faulty_step

    if "MV_FAULT_KILL_AT_STEP" in os.environ:
        kill_at, save = int(os.environ["MV_FAULT_KILL_AT_STEP"]), Trainer.save

        def save_then_die(self, *args, **kwargs):
            save(self, *args, **kwargs)
            if self.state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        Trainer.save = save_then_die

    if "MV_FAULT_SLOW_SAVE" in os.environ:
        delay, write = float(os.environ["MV_FAULT_SLOW_SAVE"]), store.RunCheckpoints.save

        def slow_save(self, *args, **kwargs):
            if self.is_main:
                print(f"fault: saving slowly ({delay:g} s)", flush=True)
                time.sleep(delay)
            return write(self, *args, **kwargs)

        store.RunCheckpoints.save = slow_save

    if "MV_FAULT_HOLD_AT_STEPS" in os.environ:
        hold_at, log_train = {int(s) for s in os.environ["MV_FAULT_HOLD_AT_STEPS"].split(",")}, Trainer.log_train

        def log_then_hold(self, out):
            log_train(self, out)
            if self.state.global_step in hold_at:
                print(f"fault: holding at global step {self.state.global_step} until a signal", flush=True)
                deadline = time.monotonic() + 120
                while not self.stops.received and time.monotonic() < deadline:
                    time.sleep(0.1)

        Trainer.log_train = log_then_hold
