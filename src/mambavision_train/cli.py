"""What the entry points share: every bad request becomes one line on stderr and exit code 2 (a config that does
not compose as well as a value that cannot be run), a stop on a signal exits with 128 + the signal's number after
its checkpoint, the process group is always torn down."""

from __future__ import annotations

import os
import sys
from dataclasses import fields, is_dataclass


def say(line: str):
    """One line on stderr in one write: stderr is write-through, so print() would send the text and its newline
    separately and the lines of several ranks could run into each other."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def entry(hydra_main):
    """Run a ``@hydra.main`` function. Hydra prints its own composition errors over several lines and exits 1; with
    HYDRA_FULL_ERROR it raises them instead, and they are reported here like any other bad request."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config import register
    from .preflight import torch_problem
    problem = torch_problem()
    if problem:
        say(f"error: {problem}")
        sys.exit(2)
    register()
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        return hydra_main()
    except (HydraException, OmegaConfBaseException) as e:
        say(f"error: {config_error(e)}")
        sys.exit(2)


def config_error(e: BaseException) -> str:
    """One line that names the key (or the group option) and what is valid."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(e, MissingConfigException) and e.options is not None:
        group, _, name = (e.missing_cfg_file or "").rpartition("/")
        return f"{group}={name} does not exist; choose one of: {', '.join(sorted(e.options))}"
    cause = e if isinstance(e, OmegaConfBaseException) else e.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and is_dataclass(cause.object_type):
            valid = ", ".join(f.name for f in fields(cause.object_type))
            return f"{cause.full_key}: no such key; {cause.object_type.__name__} has {valid}"
        return f"{cause.full_key}: {str(cause).splitlines()[0].rstrip('.')}"
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def ending(e: BaseException) -> tuple[str, int] | None:
    """The one line and exit status of an exception that ends a run as it may (a bad request, a stop on a signal
    after the checkpoint); None for anything else (a bug: its traceback is wanted)."""
    from .config import ConfigError
    from .data import DataError
    from .data.convert import ConversionError
    from .engine.resume import ResumeError
    from .engine.trainer import TrainingError
    from .models import CheckpointError
    from .preemption import Stopped
    if isinstance(e, Stopped):  # a checkpoint was written; the scheduler brings the job back if it should
        return str(e), e.code
    if isinstance(e, (ConfigError, TrainingError, ResumeError, DataError, CheckpointError, ConversionError)):
        return f"error: {e}", 2
    return None


def run_main(fn):
    from .distributed import cleanup
    try:
        return fn()
    except Exception as e:
        end = ending(e)
        if end is None:
            raise
        say(end[0])
        sys.exit(end[1])
    finally:
        cleanup()
