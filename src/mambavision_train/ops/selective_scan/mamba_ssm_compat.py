"""Importing mamba_ssm without letting it break us.

mamba_ssm imports its compiled ``selective_scan_cuda`` extension unconditionally, so on a machine where only its
Python code is installed (CPU boxes, our CI) ``import mamba_ssm`` raises. We import it lazily, only when asked, and
fall back to a stand-in extension module so its pure-PyTorch ``selective_scan_ref`` stays usable as a reference.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types


@functools.lru_cache(maxsize=None)
def has_cuda_kernel() -> bool:
    """True when mamba_ssm's compiled selective-scan extension can be imported. Only the extension: we call it
    directly (op.py), and the rest of the mamba_ssm package (Mamba2/3, tilelang, cutlass-dsl in 2.3.x) has import
    errors of its own that must not turn the kernel off. The stand-in below has no ``fwd``."""
    try:
        return hasattr(importlib.import_module("selective_scan_cuda"), "fwd")
    except Exception:  # ImportError, but also broken wheels (undefined symbols, CUDA mismatch)
        return False


@functools.lru_cache(maxsize=None)
def _interface():
    """mamba_ssm.ops.selective_scan_interface, importable even without the compiled extension (or None)."""
    if not has_cuda_kernel():
        # Only reached when the real extension failed to import: stand in for it so the module's Python loads.
        sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    try:
        return importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except Exception:
        return None


def reference_selective_scan_fn():
    """mamba_ssm's pure-PyTorch ``selective_scan_ref`` (per-step loop), or None when mamba_ssm is absent."""
    mod = _interface()
    return None if mod is None else mod.selective_scan_ref
