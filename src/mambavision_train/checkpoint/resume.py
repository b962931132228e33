"""Which checkpoint a run continues from, and whether it may.

``resume=auto`` takes the newest checkpoint of the run that loads and holds finite weights (a truncated ``last``, a
deleted one or a dangling ``last.dcp`` fall back to ``previous``, a step copy or ``best``), and every rank makes the
same choice. A checkpoint of another run (another recipe, model or world size) is refused rather than skipped,
unless ``resume_allow_changes`` says the change is meant.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import format as fmt
from . import store as ckpt
from ..distributed import all_reduce_max
from ..errors import ResumeError
from ..recipe import differences

# Settings a run may change when it resumes without resume_allow_changes: they do not change what is trained.
RESUMABLE_CHANGES = {"micro_batch_size", "amp", "model.crop_pct"}


def refuse_a_used_run_dir(run_dir: Path, resume: str):
    """``resume=never`` in a run directory that already holds a run would overwrite its checkpoints and append a
    second run to its metrics (one curve, one report of two runs): refused before anything is written."""
    used = [name for name, there in (("checkpoints", fmt.has_files(run_dir)),
                                     ("metrics.jsonl", (Path(run_dir) / "metrics.jsonl").exists())) if there]
    if resume == "never" and used:
        raise ResumeError(f"resume=never, but {run_dir} already holds a run ({', '.join(used)}): starting over there "
                          f"would overwrite its checkpoints and mix two runs in its metrics; give a new run_dir (or "
                          f"run_name), or delete that one")


def checkpoints_to_try(run_dir: Path, resume: str) -> list[Path]:
    """The checkpoints ``resume`` names, newest first; empty when a run starts from scratch."""
    if resume == "never":
        return []
    if resume != "auto":
        if not Path(resume).exists():
            raise ResumeError(f"resume={resume}: no checkpoint at {resume}")
        return [Path(resume)]
    found = fmt.candidates(run_dir)
    if not found and fmt.has_files(run_dir):
        raise ResumeError(f"{fmt.directory(run_dir)} holds files but no checkpoint; move them away or set run_dir to "
                          f"a new folder")
    return found


def load_first_good(checkpoints: ckpt.RunCheckpoints, paths, cfg, world_size: int, modules, device, log=print):
    """Restore the first of ``paths`` that loads and holds finite weights, on every rank; ``log`` prints rank 0's
    warnings (the run's RunLog).

    Returns (path, meta, [(skipped path, why)], whether changes were allowed)."""
    failed = []

    def attempt(step, *args):
        try:
            return step(*args), None
        except ckpt.CheckpointMismatch as e:
            raise ResumeError(str(e)) from None
        except Exception as e:  # truncated, dangling link, foreign file: try the next one
            return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}".rstrip(": ")

    def everywhere(ok: bool) -> bool:
        return not all_reduce_max(torch.tensor([int(not ok)], device=device)).item()

    for path in paths:
        state, why = attempt(checkpoints.read, path)
        if everywhere(why is None):
            allowed = check_same_run(cfg, state, path, world_size, log if checkpoints.is_main else None)
            _, why = attempt(checkpoints.restore, path, state)
            if everywhere(why is None):
                if ckpt.finite(modules, device):
                    return path, state, failed, allowed
                why = "non-finite weights"
        failed.append((path, why or "unreadable on another rank"))
    raise ResumeError(f"no checkpoint in {paths[0].parent} loads ({failed[-1][0].name}: {failed[-1][1]}); "
                      f"resume=PATH picks one, run_dir=NEW starts over")


def check_same_run(cfg, state: dict, path: Path, world_size: int, log=None) -> bool:
    """Refuse a resume that would silently mix two runs; returns whether recipe changes were allowed. ``log``
    (rank 0's) says which changes are applied."""
    stored = OmegaConf.create(state[fmt.CONFIG])
    changed = [(k, a, b) for k, b, a in differences(cfg, stored) if k not in RESUMABLE_CHANGES]
    world = state[fmt.WORLD_SIZE] != world_size
    if not (changed or world):
        return False
    what = "; ".join([f"{k} {a} -> {b}" for k, a, b in changed] +
                     ([f"world size {state[fmt.WORLD_SIZE]} -> {world_size}"] if world else []))
    if not cfg.resume_allow_changes:
        raise ResumeError(f"{path} is another run: {what}. Use a new run_dir, or resume_allow_changes=true to continue "
                          f"this one with the new values")
    if log is not None:
        log(f"warning: resuming {path} with changes ({what}): applied from global step "
            f"{state[fmt.STATE]['global_step']} on" + ("; not bit-exact: the per-rank random generators cannot move "
                                                     "to another number of ranks" if world else ""))
    return bool(changed)
