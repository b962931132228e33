"""Helpers shared by the benchmarks: interleaved timing and a machine description."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, {gpu}"


def interleaved(fns: dict, repeats: int = 5, warmup: int = 1, clock=time.perf_counter) -> dict:
    """Median seconds per call of each function, runs interleaved (a, b, a, b, ...) so drift hits all alike.
    ``clock=time.process_time`` gives CPU seconds (all threads), which other jobs on a shared machine inflate less."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = clock()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(clock() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def official_mambavision():
    """The official package's model module with its scan routed to mamba_ssm's reference loop (what it runs
    without the CUDA kernel)."""
    from mambavision_train.ops.selective_scan.mamba_ssm_compat import reference_selective_scan_fn

    ref = reference_selective_scan_fn()
    if ref is None:
        raise SystemExit("needs mamba-ssm and the official mambavision package: run `make setup` first")
    import mambavision.models.mamba_vision as mv

    mv.selective_scan_fn = ref
    return mv
