"""A small real detection set: scikit-learn's handwritten digits pasted onto black canvases, with boxes and
instance masks, scored by pycocotools as COCO is."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
import torch.nn.functional as F


def is_val(index: int) -> bool:
    """Which of the 1,797 digits the validation canvases draw from (one in five); the rest are for training."""
    return index % 5 == 0


def canvases(count: int, size=64, per_image=(1, 3), side=(24, 36), split: str = "train", seed: int = 0):
    """``count`` images (3, h, w) in [0, 1] (``size``: a side or (h, w)), white digits on black, 1-3 digits each,
    not overlapping, each scaled to ``side`` pixels; and their torchvision targets: boxes (tight around the mask,
    x0 y0 x1 y1), labels 1-10 (digit + 1: 0 is the background) and masks (the digit's strokes)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    pool = np.array([i for i in range(len(digits.target)) if is_val(i) == (split == "val")])
    rng = np.random.default_rng(seed)
    h, w = (size, size) if isinstance(size, int) else size
    images, targets = [], []
    for _ in range(count):
        canvas = torch.zeros(h, w)
        squares, boxes, labels, masks = [], [], [], []
        for _ in range(rng.integers(per_image[0], per_image[1] + 1)):
            for _ in range(20):  # a free place, else this canvas gets one digit fewer
                s = int(rng.integers(side[0], side[1] + 1))
                x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
                if not any(x < b[2] and b[0] < x + s and y < b[3] and b[1] < y + s for b in squares):
                    break
            else:
                continue
            i = int(rng.choice(pool))
            glyph = F.interpolate(torch.tensor(digits.images[i], dtype=torch.float32)[None, None] / 16, size=(s, s),
                                  mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
            canvas[y:y + s, x:x + s] = glyph
            mask = torch.zeros(h, w, dtype=torch.uint8)
            mask[y:y + s, x:x + s] = glyph > 0.25
            ys, xs = torch.nonzero(mask, as_tuple=True)
            squares.append((x, y, x + s, y + s))
            boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
            labels.append(int(digits.target[i]) + 1)
            masks.append(mask)
        images.append(canvas.expand(3, h, w).clone())
        targets.append(dict(boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                            labels=torch.tensor(labels, dtype=torch.int64), masks=torch.stack(masks)))
    return images, targets


def _rle(mask) -> dict:
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def coco_ap(targets, detections) -> dict:
    """COCO AP@[.5:.95] of torchvision detections (boxes, labels, scores, masks) against the targets, for boxes
    ('bbox') and masks ('segm'), with the ground truth written as a COCO annotation set."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    gt = {"images": [], "annotations": [], "categories": [{"id": c, "name": str(c - 1)} for c in range(1, 11)]}
    found = []
    for image_id, (t, d) in enumerate(zip(targets, detections)):
        h, w = t["masks"].shape[1:]
        gt["images"].append({"id": image_id, "width": w, "height": h})
        for (x0, y0, x1, y1), label, mask in zip(t["boxes"].tolist(), t["labels"].tolist(), t["masks"]):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": label,
                                      "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask.sum()), "iscrowd": 0,
                                      "segmentation": _rle(mask)})
        for (x0, y0, x1, y1), label, score, mask in zip(d["boxes"].tolist(), d["labels"].tolist(),
                                                        d["scores"].tolist(), d["masks"]):
            found.append({"image_id": image_id, "category_id": label, "bbox": [x0, y0, x1 - x0, y1 - y0],
                          "score": score, "segmentation": _rle(mask[0] > 0.5)})
    if not found:
        return {"bbox": 0.0, "segm": 0.0}
    ap = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        for kind in ("bbox", "segm"):
            run = COCOeval(coco, coco.loadRes(found), kind)
            run.evaluate()
            run.accumulate()
            run.summarize()
            ap[kind] = float(run.stats[0])
    return ap
