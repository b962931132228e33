"""What the paper and the official README report per model (ImageNet-1K val), the figures we are held to.

params: exact count of the official code; gmacs: ptflops MACs at the native resolution, selective scan excluded.
Rows marked ``pretrain="in21k"`` are ImageNet-21K-pretrained, fine-tuned on 1K: a checkpoint of that kind is
compared with them, never with the 1K-only row of the same architecture.
"""

PAPER = {
    "mambavision_t": dict(top1=82.3, top5=96.2, params=31_794_248, gmacs=4.4),
    "mambavision_t2": dict(top1=82.7, top5=96.3, params=35_104_008, gmacs=5.1),
    "mambavision_s": dict(top1=83.3, top5=96.5, params=50_140_584, gmacs=7.5),
    "mambavision_b": dict(top1=84.2, top5=96.9, params=97_685_288, gmacs=15.0),
    "mambavision_l": dict(top1=85.0, top5=97.1, params=227_961_048, gmacs=34.9),
    "mambavision_l2": dict(top1=85.3, top5=97.2, params=241_554_824, gmacs=37.5),
    "mambavision_b.in21k_ft_in1k": dict(top1=84.9, top5=97.5, params=97_685_288, gmacs=15.0, pretrain="in21k"),
    "mambavision_l.in21k_ft_in1k": dict(top1=86.1, top5=97.9, params=227_961_048, gmacs=34.9, pretrain="in21k"),
    "mambavision_l2_512": dict(top1=87.3, top5=98.4, params=241_554_824, gmacs=196.3, pretrain="in21k"),
    "mambavision_l3_256": dict(top1=87.3, top5=98.3, params=739_600_000, gmacs=122.3, pretrain="in21k"),
    "mambavision_l3_512": dict(top1=88.1, top5=98.6, params=739_600_000, gmacs=489.1, pretrain="in21k"),
}


def is_in21k(model: str, weights: str, pretrain: str = "auto") -> bool:
    """Whether weights are ImageNet-21K-pretrained: said explicitly (pretrain=1k|21k), or read from the weights'
    name (nvidia/MambaVision-B-21K, mambavision_base_21k.pth.tar), or implied by a variant that exists only so."""
    if pretrain != "auto":
        return pretrain == "21k"
    name = str(weights).rstrip("/").rsplit("/", 1)[-1]  # the file or repo name, not the folders above it
    return "21k" in name.lower() or PAPER.get(model, {}).get("pretrain") == "in21k"


def paper_row(model: str, in21k: bool) -> dict | None:
    """The paper's row for this variant and pretraining, or None when the paper reports none."""
    for key in (f"{model}.in21k_ft_in1k", model):
        row = PAPER.get(key)
        if row is not None and (row.get("pretrain") == "in21k") == in21k:
            return row
    return None
