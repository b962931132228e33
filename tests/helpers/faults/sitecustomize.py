"""Fault injection for the tests. Python imports this module at start-up when tests/helpers/faults is on PYTHONPATH (the
tests put it there with `faults(...)` from tests/helpers/runs.py); the package knows nothing about it.

Each fault is an environment variable:
  MV_FAULT_KILL_AT_STEP=N        every rank SIGKILLs itself right after the checkpoint written at global step N
  MV_FAULT_NAN=RANK:STEP[:grad]  at global step STEP (1-based), rank RANK's loss is NaN; with ':grad' the loss stays
                                 finite and its gradient is inf instead
  MV_FAULT_SLOW_SAVE=SECONDS     rank 0 waits this long inside every checkpoint save, before writing
  MV_FAULT_HOLD_AT_STEPS=N[,M..] after logging global step N, each rank waits (at most 2 minutes) until it receives
                                 a stop signal, which the next step's verdict carries to every rank: the run stops
                                 after step N + 1, so a test signals a run at a known step without racing it
  MV_FAULT_KILL_RANK=RANK:STEP   rank RANK alone SIGKILLs itself right after logging global step STEP (a rank lost
                                 to the OOM killer, an ECC error, a segfault); the other ranks are left waiting
  MV_FAULT_STALL_RANK=RANK:STEP:S rank RANK alone, right after logging global step STEP, sleeps S seconds (in a
                                 function named stalled_rank, for its stack) and then SIGSTOPs itself: a rank alive
                                 but not progressing, as on a hung file system or driver
  MV_FAULT_KILL_WORKER_AT_STEP=N after logging global step N, the training process SIGKILLs one of its DataLoader
                                 worker processes (as the OOM killer would) and prints its pid
  MV_FAULT_TOUCH=STEP:PATH       after logging global step STEP, rank 0 appends one byte to PATH (a data file
                                 rewritten under a running job)
  MV_FAULT_ONLY_WHERE=VAR=VALUE  inject the faults only in processes whose environment has VAR=VALUE (one element
                                 of an array job: SLURM_ARRAY_TASK_ID=0; the first start under torchrun:
                                 TORCHELASTIC_RESTART_COUNT=0); VAR= means VAR unset or empty (the first start of a
                                 Slurm job: SLURM_RESTART_COUNT=)
"""

import os

_where = os.environ.get("MV_FAULT_ONLY_WHERE", "=").split("=", 1)
if any(k.startswith("MV_FAULT_") for k in os.environ) and os.environ.get(_where[0], "") == _where[1]:
    import signal
    import time
    from pathlib import Path

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

    def after_logging(fault):
        """Trainer.log_train, then ``fault(trainer)``."""
        log_train = Trainer.log_train

        def log_then_fault(self, out):
            log_train(self, out)
            fault(self)

        Trainer.log_train = log_then_fault

    if "MV_FAULT_KILL_RANK" in os.environ:
        kill_rank, kill_step = map(int, os.environ["MV_FAULT_KILL_RANK"].split(":"))

        def kill_rank_at(self):
            if self.dist.rank == kill_rank and self.state.global_step == kill_step:
                print(f"fault: rank {kill_rank} killing itself after global step {kill_step} at {time.time():.3f}",
                      flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        after_logging(kill_rank_at)

    if "MV_FAULT_STALL_RANK" in os.environ:
        stall_rank, stall_step, stall_s = os.environ["MV_FAULT_STALL_RANK"].split(":")

        def stalled_rank(self):
            if self.dist.rank == int(stall_rank) and self.state.global_step == int(stall_step):
                print(f"fault: rank {stall_rank} stalling after global step {stall_step} at {time.time():.3f}",
                      flush=True)
                time.sleep(float(stall_s))
                os.kill(os.getpid(), signal.SIGSTOP)

        after_logging(stalled_rank)

    if "MV_FAULT_KILL_WORKER_AT_STEP" in os.environ:
        worker_step = int(os.environ["MV_FAULT_KILL_WORKER_AT_STEP"])

        def kill_a_worker(self):
            if self.state.global_step != worker_step:
                return
            # The training DataLoader's workers are this process's only children while it trains.
            children = sorted(int(pid) for task in Path(f"/proc/{os.getpid()}/task").iterdir()
                              for pid in (task / "children").read_text().split())
            assert children, "fault: no DataLoader worker to kill (data.num_workers=0?)"
            print(f"fault: killing DataLoader worker pid {children[0]} after global step {worker_step}", flush=True)
            os.kill(children[0], signal.SIGKILL)

        after_logging(kill_a_worker)

    if "MV_FAULT_TOUCH" in os.environ:
        touch_step, touch_path = os.environ["MV_FAULT_TOUCH"].split(":", 1)

        def touch(self):
            if self.dist.rank == 0 and self.state.global_step == int(touch_step):
                print(f"fault: appending a byte to {touch_path}", flush=True)
                with open(touch_path, "ab") as f:
                    f.write(b"\0")

        after_logging(touch)
