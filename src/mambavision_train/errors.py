"""Every way a run ends on purpose, in one place and importing nothing: a request that cannot be carried out
(bad config, missing data, a checkpoint that does not fit) or a stop on a signal after the checkpoint. The entry
points turn a ``RunError`` into its one line and exit status (``cli.run_main``); anything else is a bug and keeps
its traceback. Errors that a module handles itself (an unreadable image, a failed write) stay beside it."""

from __future__ import annotations


class RunError(Exception):
    """Ends the run with one line on stderr and exit status ``code``."""

    code = 2

    def line(self) -> str:
        return f"error: {self}"


class ConfigError(RunError, ValueError):
    """A request that cannot be run: the message names the key and what to set."""


class DataError(RunError, RuntimeError):
    """Data that is missing or not prepared: the message says how to prepare it."""


class ConversionError(DataError):
    """A dataset that cannot be converted as asked (data/convert.py)."""


class ResumeError(RunError, RuntimeError):
    """No checkpoint to continue from, or one that belongs to another run: the message says what to do."""


class TrainingError(RunError, RuntimeError):
    """A run that cannot go on (bad config, non-finite loss): the message says what to do."""


class CheckpointError(RunError, RuntimeError):
    """A checkpoint that cannot be loaded into the model as asked."""


class ReportError(RunError, ValueError):
    """An argument of report.py that is neither a run, an eval table nor a folder of them: the message says which."""


class ExportError(RunError, RuntimeError):
    """A request the exporter refuses, in one line that says what to do."""


class PeerFailed(RunError):
    """Another rank died or stopped answering inside a collective: this one ends too, with exit status 75
    (EX_TEMPFAIL), which slurm/launch.sh requeues and torchrun --max-restarts restarts."""

    code = 75


class Stopped(RunError):
    """The run stopped on a signal after writing its checkpoint; ``code`` is the process's exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code

    def line(self) -> str:
        return str(self)
