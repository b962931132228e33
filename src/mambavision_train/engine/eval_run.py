"""eval.py's work: load any weights into a variant, evaluate, compare with the paper, write the table row."""

from __future__ import annotations

import fcntl
from pathlib import Path

import torch
from timm.models import get_pretrained_cfg
from tqdm import tqdm

from ..data import Shard, build_loader
from .. import tables
from ..distributed import env_world_size, init_distributed
from ..models import is_in21k, load_pretrained, paper_row
from ..models.pretrained import read_weights
from ..preemption import requeue_on_timeout_signal
from ..preflight import check_eval
from ..precision import amp_dtype, autocast
from . import class_metrics
from ..models.build import create_model, variant_data_args
from .evaluate import evaluate

TABLE_HEAD = ["model", "weights", "top-1", "top-5", "paper top-1", "difference", "images"]


def run_eval(cfg) -> dict:
    data = check_eval(cfg, env_world_size())
    info = init_distributed(cfg.device)
    requeue_on_timeout_signal(info.is_main)
    source = str(cfg.source or get_pretrained_cfg(cfg.model.name).hf_hub_id)
    if cfg.table:  # a requeued multi-model evaluation goes on where it stopped
        done = table_row(Path(cfg.table), cfg.model.name, source)
        if done is not None:
            if info.is_main:
                print(f"eval {cfg.model.name}: already in {cfg.table} (top1 {done['top1']:.2f}), skipped", flush=True)
            return done
    model = create_model(cfg.model, data.num_classes)
    weights = read_weights(source, model, str(cfg.weights))
    load_pretrained(model, weights.state_dict)
    # Folders are labelled by name through the class map the weights were trained with, when they carry one.
    loader, aug = build_loader(data, None, train=False, batch_size=cfg.batch_size,
                               shard=Shard(info.rank, info.world_size), device=info.device, classes=weights.classes,
                               **variant_data_args(model, cfg.model))
    model.to(info.device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    dtype = amp_dtype(cfg.amp, info.device)
    progress = (lambda it: tqdm(it, desc=f"eval {cfg.model.name}", unit="batch", disable=not (info.is_main and cfg.progress)))
    out = evaluate(model, loader, aug, lambda: autocast(info.device, dtype), progress, topk=cfg.topk, confusion=True)
    row = paper_row(cfg.model.name, is_in21k(cfg.model.name, source, cfg.pretrain)) if data.num_classes == 1000 else None
    paper = row["top1"] if row else None
    out.update(model=cfg.model.name, weights=f"{source} ({weights.kind})", paper_top1=paper,
               difference=None if paper is None else out["top1"] - paper)
    names = class_names(weights.classes or getattr(loader, "classes", None), model.num_classes)
    confusion = out.pop("confusion")
    out_dir = outputs_dir(cfg, source)
    if info.is_main:
        written = class_metrics.write(confusion, names, out_dir, f"{cfg.model.name}: {source}") if out_dir else {
            "balanced_top1": class_metrics.balanced_accuracy(class_metrics.per_class(confusion, names)), "files": []}
        out["balanced_top1"] = written["balanced_top1"]
        diff = "" if paper is None else f" paper {paper:.2f} difference {out['difference']:+.2f}"
        k = f" top{cfg.topk} {out[f'top{cfg.topk}']:.3f}" if cfg.topk not in (1, 5) else ""
        print(f"eval {out['model']} top1 {out['top1']:.3f} top5 {out['top5']:.3f}{k} balanced "
              f"{out['balanced_top1']:.3f} images {out['count']}{diff}", flush=True)
        if written["files"]:
            print(f"per-class accuracy and confusion matrix: {out_dir}", flush=True)
        if cfg.table:
            append_row(Path(cfg.table), out)
    return out


def class_names(classes: list | None, num_classes: int) -> list[str]:
    """A name for every output of the model: its class map, ImageNet's synsets for a 1000-class model without one,
    else the label numbers."""
    if classes is None and num_classes == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        classes = [info.index_to_label_name(i) for i in range(1000)]
    names = list(classes or [])[:num_classes]
    return names + [str(i) for i in range(len(names), num_classes)]


def outputs_dir(cfg, source: str) -> Path | None:
    """Where the per-class files go: ``out_dir``, else beside the table, named after the model and the weights (a run
    directory's name, with the file's for one of its checkpoints; the file or repo name otherwise)."""
    if cfg.out_dir:
        return Path(cfg.out_dir)
    if not cfg.table:
        return None
    src = Path(source)
    weights = (f"{src.parent.parent.name}_" if src.parent.name == "checkpoints" else "") + src.name.split(".")[0]
    table = Path(cfg.table)
    return table.with_name(f"{table.stem}_{cfg.model.name}_{weights}")


def read_table(path: Path) -> list[dict]:
    """The rows of a table that ``append_row`` wrote, as the dicts it was given ("-" read back as None)."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines()[2:], start=3):
        cells = tables.cells(line)
        if len(cells) != len(TABLE_HEAD):
            continue
        number = lambda c: None if c == "-" else float(c)
        try:
            rows.append({"model": cells[0], "weights": cells[1], "top1": float(cells[2]), "top5": float(cells[3]),
                         "paper_top1": number(cells[4]), "difference": number(cells[5]), "count": int(cells[6])})
        except ValueError:
            raise ValueError(f"{path}, line {n}: not a row of eval.py's table ({line.strip()[:80]})") from None
    return rows


def table_row(path: Path, model: str, source: str) -> dict | None:
    """The row of ``path`` for this model and these weights, if there is one."""
    if not path.is_file():
        return None
    return next((r for r in read_table(path) if r["model"] == model and r["weights"].startswith(f"{source} (")), None)


def append_row(path: Path, r: dict):
    paper = "-" if r["paper_top1"] is None else f"{r['paper_top1']:.2f}"
    diff = "-" if r["difference"] is None else f"{r['difference']:+.2f}"
    row = tables.row([r["model"], r["weights"], f"{r['top1']:.2f}", f"{r['top5']:.2f}", paper, diff, r["count"]])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # array jobs may append at once
        f.seek(0)
        if not f.read():
            f.write(tables.markdown(TABLE_HEAD, []) + "\n")
        f.write(row + "\n")
