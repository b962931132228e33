"""Where weights come from: a local path or a Hugging Face repo id. One rule, read by the weights loader and by the
request checks (which refuse a local path that is not there before anything is built). A leaf."""
from __future__ import annotations

import os
from pathlib import Path


def repo_id(source: str | os.PathLike) -> str | None:
    """The Hugging Face repo id SOURCE names (``nvidia/MambaVision-T-1K``, ``hf-hub:nvidia/...``, either with an
    optional ``@revision``), or None: a path that exists, or one that reads as a path (``/``, ``.``, ``~`` first, or
    not exactly one ``/``)."""
    src = str(source)
    if Path(src).expanduser().exists():
        return None
    repo = src.removeprefix("hf-hub:")
    if src.startswith(("/", ".", "~")) or repo.count("/") != 1:
        return None
    return repo
