"""What the paper and the official README report per model (ImageNet-1K val), the figures we are held to.

params: exact count of the official code; gmacs: ptflops MACs at the native resolution, selective scan excluded.
"""

PAPER = {
    "mambavision_t": dict(top1=82.3, top5=96.2, params=31_794_248, gmacs=4.4),
    "mambavision_t2": dict(top1=82.7, top5=96.3, params=35_104_008, gmacs=5.1),
    "mambavision_s": dict(top1=83.3, top5=96.5, params=50_140_584, gmacs=7.5),
    "mambavision_b": dict(top1=84.2, top5=96.9, params=97_685_288, gmacs=15.0),
    "mambavision_l": dict(top1=85.0, top5=97.1, params=227_961_048, gmacs=34.9),
    "mambavision_l2": dict(top1=85.3, top5=97.2, params=241_554_824, gmacs=37.5),
    "mambavision_b.in21k_ft_in1k": dict(top1=84.9, top5=97.5, params=97_685_288, gmacs=15.0),
    "mambavision_l.in21k_ft_in1k": dict(top1=86.1, top5=97.9, params=227_961_048, gmacs=34.9),
    "mambavision_l2_512": dict(top1=87.3, top5=98.4, params=241_554_824, gmacs=196.3),
    "mambavision_l3_256": dict(top1=87.3, top5=98.3, params=739_600_000, gmacs=122.3),
    "mambavision_l3_512": dict(top1=88.1, top5=98.6, params=739_600_000, gmacs=489.1),
}
