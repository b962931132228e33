"""Print the MambaVision family table: measured parameters and MACs beside the paper's figures, and each variant's
stage-map channels (what forward_intermediates, features_only and the dense backbones give, at strides 4-32).

    python -m mambavision_train.models [--markdown]

Aligned plain text by default; ``--markdown`` prints the table as docs/models.md has it.
"""

import argparse

import timm
import torch

from . import PAPER, count_flops
from .. import tables

HEAD = ["model", "res", "eval crop", "params (ours)", "params (paper)", "GMACs (ours)", "GMACs (paper)",
        "+attn GMACs", "+scan GMACs", "paper top-1", "weights (Hugging Face repo / file)",
        "feature channels (stride 4 / 8 / 16 / 32)"]


def rows():
    for key, paper in PAPER.items():
        name, _, tag = key.partition(".")
        with torch.device("meta"):
            model = timm.create_model(name, pretrained_cfg=tag or None)
        cfg = model.pretrained_cfg
        res = cfg["input_size"][1]
        flops = count_flops(model, res)
        yield dict(model=key, res=res, crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"],
                   params=sum(p.numel() for p in model.parameters()), gmacs=flops.gmacs,
                   attn=flops.attention_macs / 1e9, scan=flops.scan_macs / 1e9, paper_params=paper["params"],
                   paper_gmacs=paper["gmacs"], top1=paper["top1"],
                   weights=f"{cfg['hf_hub_id']} / {cfg['hf_hub_filename']}",
                   channels=[f["num_chs"] for f in model.feature_info])


def cells(r) -> list[str]:
    crop = f"{r['crop_pct']}" + (" squash" if r["crop_mode"] == "squash" else "")
    return [r["model"], str(r["res"]), crop, f"{r['params']:,}", f"{r['paper_params']:,}", f"{r['gmacs']:.2f}",
            str(r["paper_gmacs"]), f"{r['attn']:.3f}", f"{r['scan']:.4f}", str(r["top1"]), r["weights"],
            " / ".join(map(str, r["channels"]))]


def markdown(table) -> str:
    head, *body = table
    return tables.markdown(head, body)


def text(table) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mambavision_train.models", description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true", help="a markdown table (docs/models.md) instead of plain text")
    args = ap.parse_args(argv)
    table = [HEAD, *map(cells, rows())]
    print(markdown(table) if args.markdown else text(table))


if __name__ == "__main__":
    main()
