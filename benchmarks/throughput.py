"""Throughput as the paper measures it: batch 128, AMP, channels_last, warm-up, then timed iterations.

    python benchmarks/throughput.py --model mambavision_t [--mode infer,train] [--batch 128] [--res 224]
        [--amp fp16|bf16|fp32] [--scan auto|cuda|triton|torch|mamba_ref] [--warmup 100] [--iters 500] [--device cuda]
        [--compile]

The paper's figures: A100, fp16 autocast, 100 warm-up + 500 timed iterations, inference only. ``train`` times a
full step (forward, cross-entropy, backward, AdamW) the same way.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
import torch.nn.functional as F

import mambavision_train  # noqa: F401
from mambavision_train import precision
from mambavision_train.precision import amp_dtype
from common import machine


def measure(model_name, mode, batch, res, amp, scan, warmup, iters, device, channels_last=True,
            compile=False) -> float:
    model = timm.create_model(model_name, scan_impl=None if scan == "auto" else scan).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net = torch.compile(model) if compile else model
    x = torch.randn(batch, 3, res, res, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    dtype = amp_dtype(amp, device)
    autocast = lambda: precision.autocast(device, dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        if mode == "infer":
            with torch.no_grad(), autocast():
                net(x)
        else:
            with autocast():
                loss = F.cross_entropy(net(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

    model.train(mode == "train")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return batch * iters / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mambavision_t", help="comma-separated")
    ap.add_argument("--mode", default="infer,train")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--amp", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--scan", default="auto", help="comma-separated: auto, cuda, triton, torch, mamba_ref")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (warm-up includes compiling)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"# throughput, batch {args.batch}, {args.res} px, {args.amp}, channels_last, {args.warmup} warm-up + "
          f"{args.iters} timed iterations; {machine()}")
    print("| model | mode | scan | img/s |")
    print("|---|---|---|---|")
    for name in args.model.split(","):
        for mode in args.mode.split(","):
            for scan in args.scan.split(","):
                ips = measure(name, mode, args.batch, args.res, args.amp, scan, args.warmup, args.iters, device,
                              compile=args.compile)
                print(f"| {name} | {mode} | {scan} | {ips:.1f} |", flush=True)


if __name__ == "__main__":
    main()
