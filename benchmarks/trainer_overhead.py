"""What the trainer costs beyond the training itself: ``Trainer.fit()`` against a bare loop of the same model, data,
optimizer, schedule, EMA and validation, side by side in one process.

    python benchmarks/trainer_overhead.py [--epochs 3] [--repeats 2] [--kind folder|ffcv] [--profile]

Both run the demo (MambaVision-demo at 32 px on the bundled digits, aug=light, AdamW, EMA, validation of the base
and the EMA weights every epoch) from the same seed on the same loader. The bare loop is what a nanoGPT-style script
would do: no checkpoints, meters, logs, metrics files or curves; a second bare loop adds timm's per-epoch
torch.save. The difference is the trainer's overhead: the exactness machinery (verdicts, RNG states), durable
checkpoints every epoch, metrics.jsonl/csv, curves.png, log lines. ``--profile``: one ``fit()`` under cProfile
instead, the trainer's parts that cost most.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch
from timm.loss import LabelSmoothingCrossEntropy

import mambavision_train  # noqa: F401
from common import machine

ROOT = Path(__file__).resolve().parents[1]


def demo_config(run_dir, epochs: int, kind: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from mambavision_train.config import register
    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=["experiment=demo", f"data.kind={kind}", f"epochs={epochs}",
                                          "logger.mode=disabled", "progress=false", f"run_dir={run_dir}"])


def trainer(cfg, profile: cProfile.Profile | None = None) -> float:
    from mambavision_train.engine.trainer import Trainer
    t = Trainer(cfg)  # building (data check, model, loaders) is not timed: the bare loop's building is not either
    t0 = time.perf_counter()
    with profile or contextlib.nullcontext():
        t.fit()
    return time.perf_counter() - t0


def bare(cfg, saves: bool = False) -> float:
    """The demo's training written out plainly with the package's own parts. ``saves``: and, as timm's train.py
    does, a ``torch.save`` of the model, EMA and optimizer after every epoch (the trainer checkpoints every epoch
    in the demo too; what it adds beyond that is its durability: fsyncs, the previous file kept, EMA exports)."""
    from mambavision_train.config import AugConfig, DataConfig, typed
    from mambavision_train.data import build_loader
    from mambavision_train.engine.ema import EMA
    from mambavision_train.engine.evaluate import evaluate
    from mambavision_train.models.build import create_model, variant_data_args
    from mambavision_train.optim import build_optimizer, build_scheduler
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, cfg.data.num_classes)
    ema = EMA(model, cfg.ema.decay)
    model = model.to(memory_format=torch.channels_last)
    ema.module.to(memory_format=torch.channels_last)
    view = variant_data_args(model, cfg.model)
    data, aug = typed(DataConfig, cfg.data), typed(AugConfig, cfg.aug)
    common = dict(res=view["res"], mean=view["mean"], std=view["std"], seed=cfg.seed)
    train, train_aug = build_loader(data, aug, train=True, batch_size=cfg.micro_batch_size, **common)
    val, val_aug = build_loader(data, aug, train=False, batch_size=cfg.eval_batch_size, **{**view, **common})
    opt = build_optimizer(cfg.optim, model)
    sched = build_scheduler(cfg.sched, opt, cfg.epochs, len(train))
    criterion = LabelSmoothingCrossEntropy(cfg.aug.smoothing)
    t0, step = time.perf_counter(), 0
    for epoch in range(cfg.epochs):
        model.train()
        train.set_epoch(epoch)
        for images, labels in train:
            step += 1
            sched.step_update(step)
            x, y = train_aug(images, labels)
            loss = criterion(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            ema.update(model)
        evaluate(model, val, val_aug)
        evaluate(ema.module, val, val_aug)
        if saves:
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                        "epoch": epoch}, Path(cfg.run_dir) / "last.pth.tar")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--kind", default="folder", choices=["folder", "ffcv"])
    ap.add_argument("--profile", action="store_true", help="one Trainer.fit() under cProfile: where its time goes")
    args = ap.parse_args()
    print(f"# trainer overhead: demo, {args.epochs} epochs, data.kind={args.kind}; {machine()}", flush=True)
    bare(demo_config(tempfile.mkdtemp(), 1, args.kind))  # warm-up: the digits built, caches filled
    if args.profile:
        profile = cProfile.Profile()
        took = trainer(demo_config(tempfile.mkdtemp(), args.epochs, args.kind), profile)
        print(f"fit() under the profiler: {took:.1f} s")
        pstats.Stats(profile).sort_stats("cumulative").print_stats("mambavision_train", 30)
        return
    runs = {"bare loop": bare, "bare loop + torch.save": lambda cfg: bare(cfg, saves=True), "Trainer.fit()": trainer}
    times = {name: [] for name in runs}
    for i in range(args.repeats):
        # each round in the other order from the last: a machine getting slower or faster favours no side
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            times[name].append(runs[name](demo_config(tempfile.mkdtemp(), args.epochs, args.kind)))
        print({k: [round(t, 2) for t in v] for k, v in times.items()}, flush=True)
    base = statistics.median(times["bare loop"])
    print("\n| run | s (median) | vs bare loop |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} | {statistics.median(ts) / base:.3f}x |")
    # Each round ran back to back: on a shared machine its ratios are steadier than the ratio of the medians
    for ref in ("bare loop", "bare loop + torch.save"):
        pairs = [t / b for b, t in zip(times[ref], times["Trainer.fit()"])]
        print(f"Trainer.fit() / {ref}, round by round: {', '.join(f'{r:.2f}' for r in pairs)} "
              f"(median {statistics.median(pairs):.2f}x)")


if __name__ == "__main__":
    main()
