"""What the entry points share: known errors become one line on stderr and exit code 2, a stop on a signal exits
with 128 + the signal's number after its checkpoint, the process group is always torn down."""

from __future__ import annotations

import sys

from .data import DataError
from .data.convert import ConversionError
from .models import CheckpointError


def run_main(fn):
    from .distributed import cleanup
    from .engine.trainer import TrainingError
    from .preemption import Stopped
    try:
        return fn()
    except Stopped as e:  # a checkpoint was written; the scheduler brings the job back if it should
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(e.code)
    except (TrainingError, DataError, CheckpointError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        cleanup()
