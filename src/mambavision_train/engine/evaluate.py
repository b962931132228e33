"""Top-1 / top-5 / loss over a loader, summed over the ranks: what training and eval.py share."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..distributed import all_reduce_max, all_reduce_sum
from ..parallel import is_sharded


@torch.no_grad()
def evaluate(model, loader, device_aug, autocast=contextlib.nullcontext, progress=None, topk: int = 5,
             confusion: bool = False) -> dict:
    """Loss, top-1, top-5 and top-``topk`` (%), and the image count, summed over the ranks; with ``confusion``
    also the confusion matrix (rows: true class, columns: predicted; counts), accumulated on the device."""
    was_training = model.training
    model.eval()
    device = device_aug.device
    k = max(5, topk)
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # loss sum, top1, top5, top-k, count
    classes = model.num_classes if confusion else 0
    matrix = torch.zeros(classes * classes, dtype=torch.int64, device=device)
    # FSDP's forward is collective: a rank with fewer batches joins the others' last forwards with dummy ones.
    lockstep = is_sharded(model)
    steps = int(all_reduce_max(torch.tensor(len(loader), device=device))) if lockstep else 0
    done = 0
    for images, labels in (progress(loader) if progress else loader):
        x, y = device_aug(images, labels)
        with autocast():
            logits = model(x)
        done += 1
        logits = logits.float()
        top = logits.topk(min(k, logits.shape[1]), dim=1).indices
        hit = top == y[:, None]
        totals += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), hit[:, 0].sum().double(),
                               hit[:, :5].any(1).sum().double(), hit[:, :topk].any(1).sum().double(),
                               torch.tensor(float(len(y)), device=device)])
        if confusion:
            matrix += torch.bincount(y * classes + top[:, 0], minlength=classes * classes)
    if done < steps:  # a stand-in image: this rank may have had no batch at all
        dummy = torch.zeros(1, 3, loader.res, loader.res, device=device).contiguous(memory_format=torch.channels_last)
    for _ in range(done, steps):
        with autocast():
            model(dummy)
    model.train(was_training)
    loss, top1, top5, top_k, n = all_reduce_sum(totals).tolist()
    if n == 0:  # else a top-1 of 0 that looks like a result
        from ..errors import DataError
        raise DataError("evaluation saw no image: the validation loader gave no batch (a set smaller than one batch, "
                        "on a loader that drops the last one?); give it more images or a smaller eval batch size")
    out = {"loss": loss / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, f"top{topk}": 100.0 * top_k / n,
           "count": int(n)}
    if confusion:
        out["confusion"] = all_reduce_sum(matrix).view(classes, classes).cpu()
    return out
