"""Code that runs in processes started by torch.multiprocessing (a real gloo group on this machine), for the tests
that check what only several ranks show without running train.py. Each function writes what it saw to
``out/<rank>.json``; ``spawn`` starts the ranks and returns those records."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist


def spawn(fn, world_size: int, out: Path, *args) -> list[dict]:
    """Each rank's record of ``fn(rank, *args)``; starting the processes costs seconds: run several checks in one."""
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_entry, args=(fn, world_size, port, str(out), args), nprocs=world_size, join=True)
    return [json.loads((out / f"{r}.json").read_text()) for r in range(world_size)]


def _entry(rank, fn, world_size, port, out, args):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        record = fn(rank, *args)
        Path(out, f"{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def fsdp_mixed_precision(rank: int) -> dict:
    """The demo model sharded as train.py shards it with bf16 parameters: the dtypes each kind of parameter has
    inside its forward."""
    import timm

    import mambavision_train  # noqa: F401
    from mambavision_train.models.mambavision import Block, MambaVisionMixer
    from mambavision_train.models.parallelize import fsdp_units
    torch.manual_seed(0)
    model = timm.create_model("mambavision_demo", img_size=32)
    fsdp_units(model, torch.bfloat16)
    seen = {}

    def record(name):
        def hook(module, args):
            for key, t in name(module).items():
                seen.setdefault(key, set()).add(str(t.dtype))
        return hook
    for m in model.modules():
        if isinstance(m, MambaVisionMixer):
            m.register_forward_pre_hook(record(lambda m: {"A_log": m.A_log, "D": m.D, "dt_bias": m.dt_proj.bias,
                                                          "in_proj": m.in_proj.weight}))
        elif isinstance(m, Block):
            m.register_forward_pre_hook(record(lambda m: {"block norm": m.norm1.weight, "mlp": m.mlp.fc1.weight}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 32, 32)).float().sum().backward()
    return {k: sorted(v) for k, v in seen.items()}


def fsdp_fp16_skip(rank: int) -> dict:
    """An inf in one gradient element that only rank 0's shard holds: does every rank's GradScaler skip the step?"""
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    before = [p.detach().to_local().clone() for p in model.parameters()]
    scaler.scale(model(torch.randn(4, 8)).sum()).backward()
    if rank == 0:  # dim 0 is sharded: row 0 of the first weight lives on rank 0 alone
        next(model.parameters()).grad.to_local()[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    stepped = any(not torch.equal(b, p.detach().to_local()) for b, p in zip(before, model.parameters()))
    return {"stepped": stepped, "scale": scaler.get_scale()}


def fsdp_eval_with_an_empty_shard(rank: int, root: str) -> dict:
    """Validation of a sharded model on a set of one image: rank 1 has no batch at all, yet must join rank 0's
    forward (FSDP's forward is collective) with a stand-in."""
    import timm

    import mambavision_train  # noqa: F401
    from mambavision_train.data import DataConfig, Shard, build_loader
    from mambavision_train.engine.evaluate import evaluate
    from mambavision_train.models.parallelize import fsdp_units
    torch.manual_seed(0)
    model = timm.create_model("mambavision_demo", img_size=32)
    fsdp_units(model, None)
    loader, aug = build_loader(DataConfig(kind="folder", root=root, num_classes=10, num_workers=0), None, train=False,
                               batch_size=4, res=32, shard=Shard(rank, 2))
    return {"batches": sum(1 for _ in loader), "count": evaluate(model, loader, aug)["count"]}


def fsdp_checks(rank: int, root: str) -> dict:
    return {"mixed_precision": fsdp_mixed_precision(rank), "fp16_skip": fsdp_fp16_skip(rank),
            "empty_shard": fsdp_eval_with_an_empty_shard(rank, root)}
