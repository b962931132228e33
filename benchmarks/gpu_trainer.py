"""The trainer on a GPU: what only a GPU shows, for benchmarks/gpu_check.py's ``trainer`` section.

- host-device syncs per optimizer step of the real training step (the demo, paper augmentation on the device,
  bf16), counted by CUDA's sync debug mode; and per batch of the device augmentation with RandAugment (FFCV's path);
- ``deterministic=true``: two runs of the same steps give the same bits (cuDNN, cuBLAS, SDPA's backward, the scan);
- ``ema_last.pth`` written on a GPU loads in a process that has no GPU.
Each check returns table rows (check, scan, setting, result, status). Needs hydra-core (gpu_check.sh: .whl/).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def demo_config(device: str, run_dir: Path, *extra):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from mambavision_train.config import register
    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[
            "experiment=demo", f"device={device}", "amp=bf16", "aug=paper", "data.kind=folder", "logger.mode=disabled",
            "progress=false", f"run_dir={run_dir}", *extra])


def count_syncs(fn, times: int) -> float:
    """Synchronizing CUDA calls per call of ``fn`` (CUDA's sync debug mode warns at each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(times):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / times


def syncs(device: str) -> list[tuple]:
    from mambavision_train.data import AugConfig
    from mambavision_train.data.augment import DeviceAugment
    from mambavision_train.engine.trainer import Trainer
    trainer = Trainer(demo_config(device, Path(tempfile.mkdtemp(prefix="gpu_syncs_"))))
    trainer.train_loader.set_epoch(0)
    batches = iter(trainer.train_loader)
    trainer.train_step(batches)  # first: allocations, kernel compilation
    per_step = count_syncs(lambda: trainer.train_step(batches), 5)
    rows = [("syncs per optimizer step", trainer.scan, "demo, bf16, aug=paper (folder loader)", f"{per_step:g}",
             "ok" if per_step <= 2 else "FAIL")]
    aug = DeviceAugment(AugConfig(), 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), device)
    images = torch.randint(0, 256, (128, 3, 224, 224), dtype=torch.uint8).pin_memory()
    labels = torch.randint(0, 1000, (128,))
    aug(images, labels)
    per_batch = count_syncs(lambda: aug(images, labels), 5)
    rows.append(("syncs per augmented batch", "-", "RandAugment + Mixup/CutMix + erasing on the device, 128 x 224 px",
                 f"{per_batch:g}", "ok" if per_batch <= 2 else "FAIL"))
    return rows


def final_weights(device: str, deterministic: bool) -> tuple[dict, Path]:
    from mambavision_train.engine.trainer import Trainer
    run_dir = Path(tempfile.mkdtemp(prefix="gpu_determinism_"))
    trainer = Trainer(demo_config(device, run_dir, "max_steps=3", f"deterministic={str(deterministic).lower()}"))
    trainer.fit()
    return {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}, run_dir


def determinism(device: str) -> list[tuple]:
    rows = []
    for deterministic in (True, False):
        (a, run_dir), (b, _) = final_weights(device, deterministic), final_weights(device, deterministic)
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        rows.append(("two runs of 3 steps, bit for bit", "auto", f"deterministic={str(deterministic).lower()}",
                     "equal" if same else "differ", "ok" if same or not deterministic else "FAIL"))
    ema = run_dir / "checkpoints" / "ema_last.pth"
    code = f"import torch; sd = torch.load({str(ema)!r}, weights_only=True); print(len(sd))"
    res = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
                         capture_output=True, text=True, timeout=120)
    rows.append(("ema_last.pth loads without a GPU", "-", "torch.load(weights_only=True), CUDA hidden",
                 res.stdout.strip() + " tensors" if res.returncode == 0 else res.stderr.strip()[-80:],
                 "ok" if res.returncode == 0 else "FAIL"))
    return rows


FFCV_PROBE = """
import os, subprocess, sys, torch
from mambavision_train.data import digits
from mambavision_train.data.ffcv_loader import FFCVLoader
root = digits.prepare(sys.argv[1])
torch.cuda.set_device(1)
loader = FFCVLoader(root / "val.beton", train=False, batch_size=64, res=32, device="cuda:1")
for images, labels in loader:
    images.to("cuda:1")
apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_bus_id", "--format=csv,noheader"],
                      capture_output=True, text=True).stdout
print(sorted({bus.strip() for pid, bus in (l.split(",") for l in apps.splitlines() if l) if int(pid) == os.getpid()}))
"""


def ffcv_contexts() -> list[tuple]:
    """A rank on GPU 1 reading a .beton: its process must hold a context on GPU 1 only (FFCV's thread used to open
    one on GPU 0 for every rank)."""
    from mambavision_train.data import ffcv_installed
    name = "FFCV rank on GPU 1: GPUs with its context"
    if not ffcv_installed() or torch.cuda.device_count() < 2:
        why = "ffcv not installed here" if not ffcv_installed() else "needs 2+ GPUs"
        return [(name, "-", "-", why, "SKIP")]
    buses = subprocess.run(["nvidia-smi", "--query-gpu=pci.bus_id", "--format=csv,noheader"], capture_output=True,
                           text=True).stdout.split()
    res = subprocess.run([sys.executable, "-c", FFCV_PROBE, tempfile.mkdtemp()], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    seen = res.stdout.strip().splitlines()[-1] if res.returncode == 0 else res.stderr.strip()[-80:]
    ok = res.returncode == 0 and seen == str([buses[1]])
    return [(name, "-", "digits val.beton, device cuda:1", seen, "ok" if ok else "FAIL")]
