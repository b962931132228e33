"""What a run leaves behind (config.yaml, overrides.txt, train.log, metrics.csv, curves.png), its logs when stdout is
a file, where run directories go, and `python -m mambavision_train.report` over runs and an eval table."""

import csv
import json
import math
import re
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from mambavision_train import curves
from mambavision_train.errors import ConfigError
from mambavision_train.preflight import check_run_root
from mambavision_train.engine.eval_run import append_row
from mambavision_train.metrics import Throughput
from mambavision_train.models import PAPER
from mambavision_train.report import main as report_main
from helpers.runs import ROOT, run

# The demo model on a small synthetic set (one random batch of 32, 4 times per epoch): 4 optimizer steps and 4
# validation batches per epoch, every step logged, 2 epochs.
SMALL = ["experiment=demo", "data=synthetic", "data.num_classes=10", "data.num_samples=128", "batch_size=32",
         "micro_batch_size=32", "eval_batch_size=32", "epochs=2", "log_every=1", "logger.mode=disabled"]
STEPS_PER_EPOCH = 4
STEP_LINE = re.compile(r"^train epoch (?P<epoch>\d+) step (?P<step>\d+)/(?P<steps>\d+) global (?P<global>\d+) "
                       r"loss (?P<loss>\S+) lr \S+ img/s \S+ data \d+% eta (?P<h>\d\d):(?P<m>\d\d):(?P<s>\d\d)$", re.M)


def step_lines(text: str) -> list[dict]:
    return [m.groupdict() for m in STEP_LINE.finditer(text)]


@pytest.fixture(scope="module")
def table(env, tmp_path_factory):
    """slurm/paper_table.sbatch's layout: two runs and the table of their evaluation. Run 0 has its stdout in a file
    and is started a second time from its epoch-0 checkpoint (previous.pth.tar), so it logs epoch 1 twice."""
    root = tmp_path_factory.mktemp("table")
    first, second = root / "0-demo", root / "1-demo"
    outs = [root / "run0.out", root / "run0-resumed.out"]
    run("train.py", *SMALL, f"run_dir={first}", env=env, stdout=outs[0])
    run("train.py", *SMALL, f"run_dir={first}", f"resume={first / 'checkpoints' / 'previous.pth.tar'}", env=env,
        stdout=outs[1])
    run("train.py", *SMALL, "seed=7", "optim.lr=0.001", f"run_dir={second}", env=env)
    run("eval.py", "model=mambavision_demo", "model.img_size=32", "data=synthetic", "data.num_classes=10",
        "data.num_samples=128", "batch_size=32", f"source={first / 'checkpoints' / 'ema_best.pth'}",
        "progress=false", f"table={root / 'table.md'}", env=env)
    # A row as eval.py writes it for official weights, to compare with the paper (no ImageNet here).
    paper = PAPER["mambavision_t"]["top1"]
    append_row(root / "table.md", {"model": "mambavision_t", "weights": "nvidia/MambaVision-T-1K (state_dict)",
                                   "top1": 82.244, "top5": 96.1, "paper_top1": paper, "difference": 82.244 - paper,
                                   "count": 50000})
    return root, outs


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def last_per_epoch(run_dir) -> dict:
    """epoch -> its record; a repeated epoch (the resumed run) counts once, its last record."""
    return {r["train/epoch"]: r for r in records(run_dir) if "val/top1" in r}


@pytest.mark.slow  # the module's runs: ~2 minutes on 2 cores, shared by these tests
def test_a_run_leaves_a_self_describing_directory(table):
    run_dir = table[0] / "0-demo"
    assert {"config.yaml", "overrides.txt", "train.log", "metrics.jsonl", "metrics.csv", "recipe.md", "curves.png",
            "checkpoints"} <= {p.name for p in run_dir.iterdir()}
    assert not list(run_dir.glob(".*.tmp"))
    cfg = OmegaConf.load(run_dir / "config.yaml")  # resolved: no interpolations left
    assert cfg.run_dir == str(run_dir) and cfg.model.name == "mambavision_demo" and cfg.batch_size == 32
    assert "${" not in (run_dir / "config.yaml").read_text()
    resume = f"resume={run_dir / 'checkpoints' / 'previous.pth.tar'}"  # the latest start's overrides
    assert (run_dir / "overrides.txt").read_text().splitlines() == [*SMALL, f"run_dir={run_dir}", resume]
    with Image.open(run_dir / "curves.png") as png:
        assert png.format == "PNG" and png.size == curves.CURVES_PX
        png.load()  # a whole image, not a truncated file
        assert sum(1 for n in png.convert("L").histogram() if n) > 16  # lines and text, not a blank canvas


@pytest.mark.slow  # the module's runs: ~2 minutes on 2 cores, shared by these tests
def test_train_log_holds_what_rank_0_printed_across_restarts(table):
    root, outs = table
    log = (root / "0-demo" / "train.log").read_text().splitlines()
    starts = [line for line in log if line.startswith("--- ")]
    assert len(starts) == 2 and starts[1].endswith("previous.pth.tar")
    printed = [line for out in outs for line in out.read_text().splitlines()]
    assert [line for line in log if not line.startswith("--- ")] == printed
    assert any(line.startswith("resumed from") for line in log[log.index(starts[1]):])
    assert sum(line.startswith("| val top-1, EMA weights") for line in log) == 2  # the summary of each start


@pytest.mark.slow  # the module's runs: ~2 minutes on 2 cores, shared by these tests
def test_stdout_in_a_file_has_step_lines_with_an_eta_for_the_whole_run(table):
    text = table[1][0].read_text()
    assert "\r" not in text and "\x1b" not in text
    steps = step_lines(text)
    assert [(int(x["epoch"]), int(x["step"])) for x in steps] == [(e, s) for e in range(2) for s in range(1, 5)]
    eta = {(int(x["epoch"]), int(x["step"])): 3600 * int(x["h"]) + 60 * int(x["m"]) + int(x["s"]) for x in steps}
    assert eta[(1, STEPS_PER_EPOCH)] == 0  # nothing left at the very end (the seconds before it: see the next test)


def test_the_eta_is_for_the_whole_run():
    # At the pace kept so far, the steps of every epoch still to come: at the end of epoch 0 of 2, one epoch is left.
    # (Driven here, not read off a demo run, whose remaining epoch can take less than the second the line shows.)
    meter = Throughput(images_per_step=32, total_steps=2 * STEPS_PER_EPOCH, done_steps=0)
    for _ in range(STEPS_PER_EPOCH):
        time.sleep(0.01)
        meter.step()
    elapsed = time.perf_counter() - meter.t0
    eta = meter.report()["eta_s"]
    assert elapsed <= eta <= 1.5 * elapsed  # the epoch to come takes as long as the one done
    for _ in range(STEPS_PER_EPOCH):
        meter.step()
    assert meter.report()["eta_s"] == 0


@pytest.mark.slow  # the module's runs: ~2 minutes on 2 cores, shared by these tests
def test_metrics_csv_has_one_row_per_epoch_as_in_metrics_jsonl(table):
    run_dir = table[0] / "0-demo"
    assert sum("val/top1" in r for r in records(run_dir)) == 3  # epoch 1 logged twice (the second start redid it)
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(curves.CSV_COLUMNS)
    epochs = last_per_epoch(run_dir)
    assert [int(r["epoch"]) for r in rows] == [0, 1] == sorted(epochs)
    for row in rows:
        want = epochs[int(row["epoch"])]
        for column, key in curves.CSV_COLUMNS.items():  # six significant digits
            assert math.isclose(float(row[column]), want[key], rel_tol=1e-5), (column, row[column], want[key])
    # The epoch's mean loss averages every step of it (all logged here), across the restart too.
    losses = {}
    for r in records(run_dir):
        if "train/loss" in r:
            losses[r["step"]] = (r["train/epoch"], r["train/loss"])
    for e, want in epochs.items():
        mean = sum(loss for epoch, loss in losses.values() if epoch == e) / STEPS_PER_EPOCH
        assert math.isclose(want["train/epoch_loss"], mean, rel_tol=1e-9)


@pytest.mark.slow  # the module's runs: ~2 minutes on 2 cores, shared by these tests
def test_curves_plot_what_metrics_jsonl_and_the_step_lines_say(table):
    run_dir = table[0] / "0-demo"
    data = curves.series(curves.read_records(run_dir / "metrics.jsonl"))
    # Per step: one point per optimizer step, at the fraction of training done; the loss is the printed one.
    printed = {int(x["global"]): float(x["loss"]) for x in step_lines(table[1][0].read_text())}
    xs, ys = data["train/loss"]
    assert xs == [g / STEPS_PER_EPOCH for g in range(1, 2 * STEPS_PER_EPOCH + 1)]
    assert [round(y, 4) for y in ys] == [printed[g] for g in range(1, 2 * STEPS_PER_EPOCH + 1)]
    steps = {r["step"]: r for r in records(run_dir) if "train/loss" in r}
    for key in ("train/lr", "train/img_per_s", "train/data_wait_frac"):
        assert data[key][1] == [steps[g][key] for g in sorted(steps)], key
    # Per epoch, the last record of a repeated epoch: validation at the epoch's end, the epoch's means at its middle.
    epochs = last_per_epoch(run_dir)
    for key in ("val/top1", "val_ema/top1", "val/loss", "val_ema/loss"):
        assert data[key] == ([1, 2], [epochs[0][key], epochs[1][key]]), key
    for key in ("train/epoch_loss", "train/epoch_img_per_s", "train/epoch_data_wait_frac"):
        assert data[key] == ([0.5, 1.5], [epochs[0][key], epochs[1][key]]), key


def test_the_line_that_ends_a_run_is_in_train_log_too(env, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "notes.txt").write_text("not a checkpoint")  # resume=auto refuses to start over
    res = run("train.py", *SMALL, f"run_dir={tmp_path}", env=env, check=False)
    assert res.returncode == 2
    assert (tmp_path / "train.log").read_text().splitlines()[-1] == res.stderr.strip().splitlines()[-1]
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "holds files but no checkpoint" in res.stderr


def test_curves_keep_the_last_record_of_a_repeated_step_or_epoch(tmp_path):
    """A run resumed from an earlier checkpoint logs steps and epochs again: the later records win, in step order."""
    step = lambda g, loss: {"step": g, "time": g, "train/loss": loss, "train/lr": 0.1, "train/img_per_s": 10.0,
                            "train/data_wait_frac": 0.5, "train/epoch": (g - 1) // 2, "train/epochs_done": g / 2}
    epoch = lambda e, top1: {"step": 2 * e + 2, "time": 9, "train/epoch": e, "val/top1": top1, "val/loss": 1.0,
                             "train/epoch_loss": 2.0, "train/lr": 0.1, "train/epoch_time_s": 3.0}
    recs = [step(1, 4.0), step(2, 3.0), epoch(0, 10.0), step(3, 2.0), step(4, 1.0), epoch(1, 20.0),
            step(3, 2.5), step(4, 1.5), epoch(1, 30.0)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 5, "trai')  # a line cut by a kill
    data = curves.series(curves.read_records(path))
    assert data["train/loss"] == ([0.5, 1.0, 1.5, 2.0], [4.0, 3.0, 2.5, 1.5])
    assert data["val/top1"] == ([1, 2], [10.0, 30.0]) and data["val_ema/top1"] == ([], [])
    rows = curves.epoch_rows(curves.read_records(path))
    assert [(r["epoch"], r["val_top1"], r["val_ema_top1"]) for r in rows] == [(0, 10.0, None), (1, 30.0, None)]
    legacy = [{k: v for k, v in r.items() if k != "train/epoch"} if "val/top1" in r else r for r in recs[:6]]
    assert [r["train/epoch"] for r in curves.epoch_records(legacy)] == [0, 1]  # records of older runs: no epoch
    curves.draw(data, tmp_path / "curves.png", title="test")  # EMA off: that line is simply not drawn
    with Image.open(tmp_path / "curves.png") as png:
        assert png.size == curves.CURVES_PX


def test_curves_png_is_redrawn_where_it_costs_little_and_always_at_the_end(tmp_path):
    """metrics.csv at every epoch's end; curves.png (about a second of matplotlib while the other ranks wait) once the
    training since its last drawing took CURVES_EVERY times that drawing, and always when the run ends."""
    from mambavision_train.metrics import CURVES_EVERY, RunMetrics
    record = lambda e: {"step": e + 1, "time": e, "train/epoch": e, "val/top1": 10.0 * e, "val/loss": 1.0,
                        "train/epoch_loss": 2.0, "train/lr": 0.1, "train/epoch_time_s": 3.0}
    jsonl, png = tmp_path / "metrics.jsonl", tmp_path / "curves.png"
    m = RunMetrics(tmp_path, logger=None, meter=None, log=print, is_main=True, live=False)
    jsonl.write_text(json.dumps(record(0)) + "\n")
    m.summarize(1)  # an epoch of under CURVES_EVERY x the assumed second: the table, not the figure
    assert len(list(csv.DictReader(open(tmp_path / "metrics.csv")))) == 1 and not png.exists()
    m.summarize(1, final=True)
    assert png.exists() and m.draw_s > 0
    drawn = png.stat().st_mtime_ns
    jsonl.write_text(jsonl.read_text() + json.dumps(record(1)) + "\n")
    m.drawn_time = time.monotonic() - (CURVES_EVERY - 1) * m.draw_s  # not long enough since that drawing
    m.summarize(2)
    assert png.stat().st_mtime_ns == drawn and len(list(csv.DictReader(open(tmp_path / "metrics.csv")))) == 2
    m.drawn_time = time.monotonic() - (CURVES_EVERY + 1) * m.draw_s
    m.summarize(3)
    assert png.stat().st_mtime_ns != drawn


def test_runs_go_under_run_root_or_mambavision_runs(monkeypatch):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        monkeypatch.delenv("MAMBAVISION_RUNS", raising=False)
        assert compose("train", overrides=["experiment=demo"]).run_dir == "runs/demo"
        monkeypatch.setenv("MAMBAVISION_RUNS", "/scratch/me/runs")
        assert compose("train", overrides=["experiment=paper_mambavision_b"]).run_dir == \
            "/scratch/me/runs/paper_mambavision_b"
        assert compose("train", overrides=["experiment=demo", "run_root=/fast"]).run_dir == "/fast/demo"
        monkeypatch.setenv("MAMBAVISION_RUNS", "")
        with pytest.raises(ConfigError, match=r"^run_root is empty"):
            check_run_root(compose("train", overrides=["experiment=demo"]))
        check_run_root(compose("train", overrides=["experiment=demo", "run_dir=/tmp/x"]))  # not used: fine


def markdown_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell} |")]


@pytest.mark.slow  # the module's runs: ~2 minutes on 2 cores, shared by these tests
def test_report_over_two_runs_and_an_eval_table(table, tmp_path, capsys):
    root, _ = table
    out = tmp_path / "report"
    assert report_main([str(root), "--out", str(out)]) == 0  # the folder, as paper_table.sbatch passes it
    text = (out / "report.md").read_text()
    for png in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):  # every figure linked is there and is a PNG
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.size[0] > 500
    assert {"curves-0-0-demo.png", "curves-1-1-demo.png", "runs.png", "reproduction.png"} <= \
        {p.name for p in out.iterdir()}
    for name in ("0-demo", "1-demo"):
        epochs = last_per_epoch(root / name)
        last = epochs[max(epochs)]
        best = max(epochs.values(), key=lambda r: r["val/top1"])
        best_ema = max(epochs.values(), key=lambda r: r["val_ema/top1"])
        train_s = sum(r["train/epoch_time_s"] for r in epochs.values())
        images = sum(r["train/epoch_time_s"] * r["train/epoch_img_per_s"] for r in epochs.values())
        assert last["val/top1"] > 0 and last["val_ema/top1"] > 0  # a validation set that is not empty
        [row] = markdown_rows(text, name)
        assert row[:7] == [name, "mambavision_demo", "2", f"{last['val/top1']:.2f}", f"{last['val_ema/top1']:.2f}",
                           f"{best['val/top1']:.2f} (epoch {best['train/epoch']})",
                           f"{best_ema['val_ema/top1']:.2f} (epoch {best_ema['train/epoch']})"], row
        assert row[9] == f"{images / train_s:.1f}"
    [demo] = markdown_rows(text, "mambavision_demo")
    assert demo[1].startswith(str(root / "0-demo" / "checkpoints" / "ema_best.pth")) and demo[3:5] == ["-", "-"]
    [t] = markdown_rows(text, "mambavision_t")
    assert t[2:5] == ["82.24", "82.30", "-0.06"]


def test_report_refuses_what_is_neither_a_run_nor_a_table(tmp_path, capsys):
    assert report_main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path}: not a run directory"), err
    assert not (tmp_path / "out").exists()
