"""Runs and evaluations as one markdown report with its figures (docs/training.md, docs/reproduce.md).

    python -m mambavision_train.report RUN_DIR [RUN_DIR ...] [TABLE.md ...] [--out DIR]

Each argument is a run directory (it holds metrics.jsonl), a table eval.py wrote (``table=``), or a folder of those
(slurm/paper_table.sbatch's TABLE_DIR: its run directories and its table.md). For runs: the curves, the final and
best top-1 of the base and EMA weights, the time and img/s. For evaluations: the reproduction table next to the
paper's numbers with the difference, as markdown and as a bar chart. DIR (default ``report``) gets report.md and
the PNGs it links to by relative paths, so the folder can be copied whole.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import curves, files, tables
from .errors import ReportError
from .engine.eval_run import read_table
from .metrics import duration

# Okabe-Ito, in order: one colour per run in the comparison figure.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")


def collect(paths: list[str]) -> tuple[list[Path], list[Path]]:
    """(run directories, eval tables) named by the arguments, in their order."""
    runs, tables = [], []
    for arg in paths:
        p = Path(arg)
        if p.is_file():
            tables.append(p)
        elif (p / "metrics.jsonl").is_file():
            runs.append(p)
        else:
            found = sorted(d for d in p.iterdir() if (d / "metrics.jsonl").is_file()) if p.is_dir() else []
            table = [p / "table.md"] if (p / "table.md").is_file() else []
            if not found + table:
                raise ReportError(f"{arg}: not a run directory (no metrics.jsonl), an eval table (eval.py table=) or "
                                  f"a folder holding them")
            runs, tables = runs + found, tables + table
    return runs, tables


def model_name(run: Path) -> str:
    from omegaconf import OmegaConf
    config = run / "config.yaml"
    return str(OmegaConf.select(OmegaConf.load(config), "model.name", default="-")) if config.is_file() else "-"


def summarize(run: Path) -> dict:
    """What the report says about one run, from its metrics.jsonl (the last record of a repeated epoch wins)."""
    records = curves.read_records(run / "metrics.jsonl")
    epochs = curves.epoch_records(records)
    out = {"name": run.name, "path": str(run), "model": model_name(run), "epochs": len(epochs),
           "steps": max((r["step"] for r in records), default=0)}
    for kind, key in (("base", "val/top1"), ("ema", "val_ema/top1")):
        scored = [(r[key], r.get("train/epoch")) for r in epochs if r.get(key) is not None]
        out[f"final_{kind}"] = scored[-1][0] if scored else None
        out[f"best_{kind}"] = max(scored, key=lambda s: s[0]) if scored else None
    timed = [r for r in epochs if "train/epoch_time_s" in r]
    train_s = sum(r["train/epoch_time_s"] for r in timed)
    images = sum(r["train/epoch_time_s"] * r["train/epoch_img_per_s"] for r in timed if "train/epoch_img_per_s" in r)
    out["train_s"] = train_s if timed else None
    out["img_per_s"] = images / train_s if images and train_s else None
    out["wall_s"] = records[-1]["time"] - records[0]["time"] if len(records) > 1 else None
    return out


def fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def best(b) -> str:
    return "-" if b is None else f"{b[0]:.2f} (epoch {b[1]})"


def runs_markdown(summaries: list[dict], names: list[str]) -> list[str]:
    head = ["run", "model", "epochs", "final top-1", "final top-1 EMA", "best top-1", "best top-1 EMA", "train time",
            "wall time", "img/s"]
    rows = [(s["name"], s["model"], s["epochs"], fmt(s["final_base"]), fmt(s["final_ema"]), best(s["best_base"]),
             best(s["best_ema"]), "-" if s["train_s"] is None else duration(s["train_s"]),
             "-" if s["wall_s"] is None else duration(s["wall_s"]), fmt(s["img_per_s"], ".1f")) for s in summaries]
    lines = ["## Runs", "", *tables.markdown(head, rows).splitlines(), "", "Top-1 on the validation split during training (%), of the last epoch and the best one; train time "
              "adds up the epochs' training (validation excluded), wall time runs from the first to the last record "
              "(restarts and queueing included); img/s over the training time.", ""]
    if len(summaries) > 1:
        lines += ["![validation top-1 and training loss of every run](runs.png)", ""]
    for s, name in zip(summaries, names):
        lines += [f"### {s['name']}", "", f"`{s['path']}`, {s['steps']} optimizer steps", "",
                  f"![curves of {s['name']}]({name})", ""]
    return lines


def comparison(runs: list[Path], path: Path):
    """runs.png: validation top-1 (EMA dashed) and training loss of every run, one colour per run."""
    fig, axes = curves.figure((9.0, 3.4), 1, 2)
    top1, loss = axes[0]
    curves.label(top1, "validation top-1", "top-1 (%)")
    curves.label(loss, "training loss", "loss")
    for run, colour in zip(runs, PALETTE * (len(runs) // len(PALETTE) + 1)):
        data = curves.series(curves.read_records(run / "metrics.jsonl"))
        for key, dash in (("val/top1", "-"), ("val_ema/top1", "--")):
            xs, ys = data[key]
            if xs:
                top1.plot(xs, ys, dash, color=colour, lw=1.3, marker="o", ms=2,
                          label=f"{run.name}{' EMA' if 'ema' in key else ''}")
        loss.plot(*data["train/loss"], color=colour, lw=0.9, label=run.name)
    for ax in (top1, loss):
        curves.epoch_axis(ax)
    top1.legend(frameon=False, fontsize=7)
    curves.save(fig, path)


def eval_rows(tables: list[Path]) -> list[dict]:
    """Every table's rows; a model evaluated twice with the same weights keeps its last row."""
    rows = {}
    for t in tables:
        try:
            rows.update({(r["model"], r["weights"]): r for r in read_table(t)})
        except ValueError as e:
            raise ReportError(str(e)) from None
    return list(rows.values())


def short(model: str) -> str:
    return model.removeprefix("mambavision_")


def eval_markdown(rows: list[dict]) -> list[str]:
    head = ["model", "weights", "top-1", "paper top-1", "difference", "top-5", "images"]
    body = [(r["model"], r["weights"], f"{r['top1']:.2f}", fmt(r["paper_top1"]), fmt(r["difference"], "+.2f"),
             f"{r['top5']:.2f}", r["count"]) for r in rows]
    return ["## Reproduction", "", *tables.markdown(head, body).splitlines(), "", "Validation top-1 and top-5 (%) from eval.py; the paper's numbers are those of Hatamizadeh & "
                        "Kautz (2024) and the official README (src/mambavision_train/models/paper.py), '-' where there "
                        "is none (another data set, or a variant they do not list).", "",
                    "![top-1 against the paper](reproduction.png)", ""]


# What counts as reproduced (docs/reproduce.md): the mean over seeds within this many points of the paper's top-1,
# about twice the run-to-run spread reported for the official code (0.1-0.2 points, NVlabs/MambaVision #57).
REPRODUCED_WITHIN = 0.3


def seed_groups(rows: list[dict]) -> dict:
    """Rows of the same model trained with several seeds (paper_table.sbatch's SEEDS: run directories
    ``<i>-<experiment>-seed<s>``), by (model, experiment); a group needs two rows or more."""
    import re
    groups = {}
    for r in rows:
        run = re.search(r"(?:^|/)(\d+-)?([^/]+)-seed\d+/checkpoints/", r["weights"])
        if run:
            groups.setdefault((r["model"], run.group(2)), []).append(r)
    return {k: v for k, v in groups.items() if len(v) > 1}


def seeds_markdown(groups: dict) -> list[str]:
    import statistics
    body = []
    for (model, experiment), rs in groups.items():
        top1 = [r["top1"] for r in rs]
        mean, std, paper = statistics.mean(top1), statistics.stdev(top1), rs[0]["paper_top1"]
        if paper is None:
            verdict, diff = "-", None
        else:
            diff = mean - paper
            verdict = "reproduced" if abs(diff) <= REPRODUCED_WITHIN else "above" if diff > 0 else "not reproduced"
        body.append((model, experiment, len(rs), f"{mean:.2f} ± {std:.2f}", f"{max(top1) - min(top1):.2f}", fmt(paper),
                     fmt(diff, "+.2f"), verdict))
    head = ["model", "experiment", "seeds", "top-1 mean ± std", "spread (max - min)", "paper top-1", "mean - paper",
            "verdict"]
    return ["## Seeds", "", *tables.markdown(head, body).splitlines(), "", f"Reproduced: the mean over seeds within {REPRODUCED_WITHIN} points of the paper (docs/"
                        f"reproduce.md says why); std is the sample standard deviation over the seeds.", ""]


def bar_chart(rows: list[dict], path: Path):
    """reproduction.png: ours next to the paper per model, and the difference on its own zero-based axis (a bar
    chart of two close top-1 values shows the gap only on a cut axis)."""
    compared = [r for r in rows if r["paper_top1"] is not None]
    fig, axes = curves.figure((9.0, 3.4) if compared else (5.0, 3.4), 1, 2 if compared else 1)
    ax = axes[0][0]
    curves.label(ax, "validation top-1", "top-1 (%)")
    names = [short(r["model"]) for r in rows]
    names = [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]
    xs = range(len(rows))
    width = 0.38 if compared else 0.6
    ours = ax.bar([x - width / 2 * bool(compared) for x in xs], [r["top1"] for r in rows], width, color=PALETTE[0],
                  label="reproduced")
    ax.bar_label(ours, fmt="%.1f", fontsize=6, padding=1)
    if compared:
        paper = [(x, r["paper_top1"]) for x, r in zip(xs, rows) if r["paper_top1"] is not None]
        bars = ax.bar([x + width / 2 for x, _ in paper], [p for _, p in paper], width, color="#9a9a9a", label="paper")
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
        low = min(min(r["top1"] for r in rows), min(p for _, p in paper))
        ax.set_ylim(max(0.0, 5 * (low // 5) - 5), 100)  # the axis starts near the values; it says where
        ax.legend(frameon=False, fontsize=7, loc="upper left", ncols=2)
        diff = axes[0][1]
        curves.label(diff, "reproduced - paper", "difference (points)")
        ds = [r["difference"] for r in compared]
        d_bars = diff.bar(range(len(compared)), ds, 0.6, color=[PALETTE[2] if d >= 0 else PALETTE[1] for d in ds])
        diff.bar_label(d_bars, fmt="%+.2f", fontsize=6, padding=1)
        diff.axhline(0, color="#222222", lw=0.6)
        diff.set_xticks(range(len(compared)), [n for n, r in zip(names, rows) if r["paper_top1"] is not None],
                        fontsize=7)
        span = max(max(abs(d) for d in ds), 0.1) * 1.3
        diff.set_ylim(-span, span)
    ax.set_xticks(list(xs), names, fontsize=7)
    curves.save(fig, path)


def write(paths: list[str], out: Path) -> Path:
    """report.md and its PNGs in ``out``; returns the path of report.md."""
    runs, tables = collect(paths)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Report", ""]
    if runs:
        summaries = [summarize(r) for r in runs]
        names = [f"curves-{i}-{r.name}.png" for i, r in enumerate(runs)]  # two runs may share a folder name
        for run, name in zip(runs, names):
            curves.draw(curves.series(curves.read_records(run / "metrics.jsonl")), out / name, title=run.name)
        if len(runs) > 1:
            comparison(runs, out / "runs.png")
        lines += runs_markdown(summaries, names)
    rows = eval_rows(tables)
    if rows:
        bar_chart(rows, out / "reproduction.png")
        lines += eval_markdown(rows)
        groups = seed_groups(rows)
        if groups:
            lines += seeds_markdown(groups)
    report = out / "report.md"
    files.write_text(report, "\n".join(lines).rstrip() + "\n")
    return report


def main(argv=None) -> int:
    from .log import say
    parser = argparse.ArgumentParser(prog="python -m mambavision_train.report", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run directory, eval table, or a folder of them")
    parser.add_argument("--out", default="report", help="folder for report.md and its figures (default: report)")
    args = parser.parse_args(argv)
    try:
        report = write(args.paths, Path(args.out))
    except ReportError as e:
        say(f"error: {e}")
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
