"""One MambaVision-T step, ours vs the official package (with mamba_ssm's reference scan), side by side.

    python benchmarks/model_step.py [--batch 8] [--res 224] [--threads 2] [--repeats 5]

train: forward + cross-entropy + backward + AdamW step; eval: forward under no_grad. Same weights in both.
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F

import mambavision_train  # noqa: F401
from common import interleaved, machine, official_mambavision


def train_step(model, opt, x, y):
    def run():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return run


def eval_step(model, x):
    def run():
        with torch.no_grad():
            model(x)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mv = official_mambavision()
    torch.manual_seed(0)
    official = mv.mamba_vision_T()
    ours = timm.create_model("mambavision_t")
    ours.load_state_dict(official.state_dict())
    x = torch.randn(args.batch, 3, args.res, args.res)
    y = torch.randint(0, 1000, (args.batch,))
    print(f"# MambaVision-T, batch {args.batch}, {args.res} px, fp32, {machine()}")
    print("| step | official (mamba_ref scan) s | ours s | speed-up |")
    print("|---|---|---|---|")
    for m in (official, ours):
        m.train()
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in (("official", official), ("ours", ours))}
    t = interleaved({"official": train_step(official, opts["official"], x, y),
                     "ours": train_step(ours, opts["ours"], x, y)}, repeats=args.repeats)
    print(f"| train (fwd+loss+bwd+AdamW) | {t['official']:.3f} | {t['ours']:.3f} | {t['official'] / t['ours']:.2f}x |")
    for m in (official, ours):
        m.eval()
    t = interleaved({"official": eval_step(official, x), "ours": eval_step(ours, x)}, repeats=args.repeats)
    print(f"| eval forward | {t['official']:.3f} | {t['ours']:.3f} | {t['official'] / t['ours']:.2f}x |")


if __name__ == "__main__":
    main()
