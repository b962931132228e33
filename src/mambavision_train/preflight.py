"""What the machine must have before any request is read: checks of the environment, not of the config.

The torch floor is what the code needs, not a guess: FSDP2's public API (``torch.distributed.fsdp.fully_shard`` and
``FSDPModule``, imported on every run) is there from 2.6, the Triton kernels' ``tl.range(..., loop_unroll_factor=)``
comes with the Triton of torch 2.6, and FSDP2 honours ``reshard_after_forward`` on the root module from 2.8 (before,
the EMA teacher's forward under MESA leaves the root parameters gathered and the EMA update fails on their shapes).
CI tests torch 2.14.1.
"""

from __future__ import annotations

TORCH_FLOOR = "2.8"


def torch_problem() -> str | None:
    """One line saying why this torch cannot run the project, or None."""
    import torch
    if torch.__version__ < TORCH_FLOOR:  # TorchVersion compares as a version, not as text
        return (f"torch {torch.__version__} is too old: mambavision-train needs torch >= {TORCH_FLOOR} (FSDP2's "
                f"public API and root resharding, Triton 3.2); pip install 'torch>={TORCH_FLOOR}' with the build for "
                f"your CUDA (https://pytorch.org/get-started/locally/)")
    return None
