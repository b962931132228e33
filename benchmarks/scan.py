"""Selective scan forward+backward: our PyTorch scan vs mamba_ssm's selective_scan_ref, side by side.

    python benchmarks/scan.py [--threads 2] [--repeats 7]

Shapes are MambaVision-T's stage 3 (d=160, l=196) and stage 4 (d=320, l=49), d_state 8, with z=None, D and
delta_bias as the model calls it.
"""

from __future__ import annotations

import argparse

import torch

from common import interleaved, machine
from mambavision_train.ops.selective_scan import selective_scan

SHAPES = [(8, 160, 196), (8, 320, 49), (32, 160, 196)]


def inputs(b, d, l, n=8, device="cpu"):
    g = torch.Generator().manual_seed(0)
    t = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g)).to(device).requires_grad_()
    A = (-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)).to(device).requires_grad_()
    return dict(u=t(b, d, l), delta=t(b, d, l, scale=0.5), A=A, B=t(b, n, l), C=t(b, n, l), D=t(d),
                delta_bias=t(d, scale=0.1))


def step(impl, x):
    def run():
        out = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], delta_bias=x["delta_bias"],
                             delta_softplus=True, impl=impl)
        out.sum().backward()
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--impls", default="mamba_ref,torch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    impls = args.impls.split(",")
    print(f"# selective scan fwd+bwd, fp32, {machine()}")
    print("| (b, d, l, n) | " + " | ".join(f"{i} ms" for i in impls) + " | speed-up |")
    print("|---|" + "---|" * (len(impls) + 1))
    for b, d, l in SHAPES:
        x = inputs(b, d, l)
        t = interleaved({i: step(i, x) for i in impls}, repeats=args.repeats)
        ratio = t[impls[0]] / t[impls[-1]]
        print(f"| ({b}, {d}, {l}, 8) | " + " | ".join(f"{t[i] * 1e3:.1f}" for i in impls) + f" | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
