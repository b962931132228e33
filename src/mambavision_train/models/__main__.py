"""Print the MambaVision family table: measured parameters and MACs beside the paper's figures.

    python -m mambavision_train.models [--markdown]
"""

import argparse

import timm
import torch

from . import PAPER, count_flops


def rows():
    for key, paper in PAPER.items():
        name, _, tag = key.partition(".")
        with torch.device("meta"):
            model = timm.create_model(name, pretrained_cfg=tag or None)
        cfg = model.pretrained_cfg
        res = cfg["input_size"][1]
        flops = count_flops(model, res)
        yield dict(model=key, res=res, crop_pct=cfg["crop_pct"], params=sum(p.numel() for p in model.parameters()),
                   gmacs=flops.gmacs, attn=flops.attention_macs / 1e9, scan=flops.scan_macs / 1e9,
                   paper_params=paper["params"], paper_gmacs=paper["gmacs"], top1=paper["top1"],
                   weights=f"{cfg['hf_hub_id']}/{cfg['hf_hub_filename']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.parse_args()
    head = ["model", "res", "crop", "params (ours)", "params (paper)", "GMACs (ours)", "GMACs (paper)",
            "+attn GMACs", "+scan GMACs", "paper top-1", "weights (Hugging Face)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows():
        print(f"| {r['model']} | {r['res']} | {r['crop_pct']} | {r['params']:,} | {r['paper_params']:,} | "
              f"{r['gmacs']:.2f} | {r['paper_gmacs']} | {r['attn']:.3f} | {r['scan']:.4f} | {r['top1']} | "
              f"{r['weights']} |")


if __name__ == "__main__":
    main()
