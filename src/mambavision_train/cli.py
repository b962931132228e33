"""What the entry points share: every bad request becomes one line on stderr and exit code 2 (a config that does
not compose as well as a value that cannot be run), a stop on a signal exits with 128 + the signal's number after
its checkpoint, the process group is always torn down."""

from __future__ import annotations

import os
import sys
from dataclasses import fields, is_dataclass

from .errors import RunError
from .log import say


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
            new = getattr(cause.object_type, "renamed", {}).get(cause.full_key)
            if new:
                return f"{cause.full_key}: renamed; use {new}= with the same value"
            valid = ", ".join(f.name for f in fields(cause.object_type))
            return f"{cause.full_key}: no such key; {cause.object_type.__name__} has {valid}"
        return f"{cause.full_key}: {str(cause).splitlines()[0].rstrip('.')}"
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def run_main(fn):
    from .distributed import cleanup
    try:
        return fn()
    except Exception as e:
        if not isinstance(e, RunError):
            raise  # a bug: its traceback is wanted
        say(e.line())
        sys.exit(e.code)
    finally:
        cleanup()
