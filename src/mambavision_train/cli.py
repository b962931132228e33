"""What the entry points share: known errors become one line on stderr and exit code 2, the process group is
always torn down."""

from __future__ import annotations

import sys

from .data import DataError
from .data.convert import ConversionError
from .models import CheckpointError


def run_main(fn):
    from .distributed import cleanup
    from .engine.trainer import TrainingError
    try:
        return fn()
    except (TrainingError, DataError, CheckpointError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        cleanup()
