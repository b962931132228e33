"""The two ways the package speaks: ``say`` (one line on stderr, any rank) and ``RunLog`` (rank 0's lines, on
stdout and in train.log). A leaf: the standard library only, as torchtitan's logging module."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path


def say(line: str):
    """One line on stderr in one write: stderr is write-through, so print() would send the text and its newline
    separately and the lines of several ranks could run into each other."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class RunLog:
    """Rank 0's lines, on stdout and appended to train.log; off rank 0 (``path`` None) nothing: the other ranks
    would repeat them. The file is opened per line, so nothing stays open and a crash loses no line."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, text: str, console: bool = True):
        """``console=False``: the log only (a line a progress bar replaces on a terminal, or one that cli.py already
        writes to stderr)."""
        if self.path is None:
            return
        if console:
            print(text, flush=True)
        with open(self.path, "a") as f:
            f.write(text + "\n")

    @contextlib.contextmanager
    def failures(self):
        """The line that ends the run (cli.py writes it to stderr) goes into train.log too."""
        from .errors import RunError
        try:
            yield
        except BaseException as e:
            self(e.line() if isinstance(e, RunError) else f"error: {type(e).__name__}: {e} (the traceback is on stderr)",
                 console=False)
            raise
