"""A user's own image folders, start to finish: the fine-tuning commands of the README and docs/finetune.md run as
written (the demo model and five classes of the bundled digits standing in for theirs), the class map that follows
the run into checkpoints, eval.py and predict, the split checks, and the per-class evaluation."""

import csv
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.runs import ROOT, final_state, run, run_in_process

NAMES = ["zero", "one", "two", "three", "four"]
QUIET = ["progress=false", "logger.mode=disabled"]


@pytest.fixture(scope="module")
def five_classes(env, tmp_path_factory) -> Path:
    """The digits 0-4 as an ImageFolder tree with named classes: 721 train and 180 val images."""
    from mambavision_train.data import digits
    images = digits.prepare(Path(env["MAMBAVISION_CACHE"]) / "digits", beton=False) / "images"
    root = tmp_path_factory.mktemp("five")
    for split in ("train", "val"):
        for digit, name in enumerate(NAMES):
            shutil.copytree(images / split / str(digit), root / split / name)
    return root


def predict(*args, env):
    return subprocess.run([sys.executable, "-m", "mambavision_train.predict", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def documented(text: str, starts: str) -> list[str]:
    """The arguments of the first command line in ``text`` that starts with ``starts``."""
    line = next(ln.strip() for ln in text.splitlines() if ln.strip().startswith(starts))
    return shlex.split(line.split("  #")[0])[2:]


def as_here(args: list[str], subs: dict) -> list[str]:
    """A documented command's overrides with the user's values replaced by this test's (model, weights, data)."""
    out = []
    for a in args:
        for old, new in subs.items():
            a = re.sub(rf"{re.escape(old)}\b", new, a)  # mambavision_t, not mambavision_train
        out.append(a)
    return out


@pytest.fixture(scope="module")
def finetuned(env, five_classes, five_steps, tmp_path_factory):
    """The README's fine-tuning one-liner, as written but for the model, the weights, the data and the epochs (3,
    for the suite's time), into its own run directory; returns (run directory, stdout)."""
    line = documented((ROOT / "README.md").read_text(), "python train.py experiment=finetune_own")
    run_dir = tmp_path_factory.mktemp("own") / "run"
    args = as_here(line, {"mambavision_t": "mambavision_demo", "nvidia/MambaVision-T-1K": str(five_steps),
                          "/data/mine": str(five_classes)})
    assert args == ["experiment=finetune_own", "model=mambavision_demo", f"init_from={five_steps}",
                    f"data.root={five_classes}", "data.num_classes=5"]
    res = run("train.py", *args, "model.img_size=32", "epochs=3", "data.num_workers=2", *QUIET, f"run_dir={run_dir}",
              env=env, timeout=900)
    return run_dir, res.stdout


@pytest.mark.slow
def test_the_readme_fine_tuning_one_liner_learns_the_new_classes(finetuned):
    run_dir, out = finetuned
    assert "initialised from" in out and "(EMA weights, new classifier)" in out
    assert "warning: ema.decay" not in out  # its EMA follows a short run
    state = final_state(run_dir)
    assert state["state"]["best_top1"] > 70.0, out[-2000:]  # chance: 20%; the EMA selects it
    assert json.loads((run_dir / "classes.json").read_text())["classes"] == sorted(NAMES)
    assert state["classes"] == sorted(NAMES)
    assert torch.load(run_dir / "checkpoints" / "ema_best.pth", weights_only=True)["classes"] == sorted(NAMES)


@pytest.mark.slow
def test_the_docs_walk_through_evaluates_and_predicts_as_written(env, finetuned, five_classes, tmp_path):
    """docs/finetune.md's evaluation and prediction commands on the README run: per-class files with the class
    names, balanced accuracy, predictions by name."""
    run_dir, _ = finetuned
    docs = (ROOT / "docs" / "finetune.md").read_text()
    subs = {"mambavision_t": "mambavision_demo", "/data/flowers": str(five_classes), "num_classes=102":
            "num_classes=5", "runs/flowers_t": str(run_dir), "/data/new_photos": str(five_classes / "val" / "three"),
            "predictions.csv": str(tmp_path / "predictions.csv")}
    res = run("eval.py", *as_here(documented(docs, "python eval.py"), subs), "model.img_size=32", *QUIET[:1], env=env)
    top1, balanced = map(float, re.search(r"top1 (\S+) top5 \S+ balanced (\S+)", res.stdout).groups())
    assert top1 > 70.0 and balanced > 70.0, res.stdout
    rows = list(csv.DictReader(open(run_dir / "eval" / "per_class.csv")))
    assert [r["class"] for r in rows] == sorted(NAMES) and sum(int(r["images"]) for r in rows) == 180
    assert (run_dir / "eval" / "confusion.png").is_file()
    confusion = list(csv.reader(open(run_dir / "eval" / "confusion.csv")))
    assert confusion[0][1:] == sorted(NAMES) and sum(int(c) for r in confusion[1:] for c in r[1:]) == 180
    args = as_here(documented(docs, "python -m mambavision_train.predict")[1:], subs)
    res = predict(*args, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    n = len(list((five_classes / "val" / "three").iterdir()))
    assert len(rows) == n and set(rows[0]) == {"path", *[f"{k}_{i}" for i in range(1, 6) for k in ("class", "prob")]}
    assert sum(r["class_1"] == "three" for r in rows) > n * 0.7  # by name
    assert f"predicted {n} images (0 unreadable, skipped)" in res.stdout


def test_train_and_val_with_other_class_folders_is_one_line(env, five_classes, tmp_path):
    """A class folder missing from val/ used to shift every later label in silence (two ImageFolders, each with its
    own sorted indices): now one line names it, before anything is built."""
    tree = tmp_path / "tree"
    shutil.copytree(five_classes, tree)
    shutil.rmtree(tree / "val" / "two")
    (tree / "val" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes (as the converter has it)
    res = run_in_process("train.py", "experiment=finetune_own", "model=mambavision_demo", "init_from=null",
                         f"data.root={tree}", "data.num_classes=5", f"run_dir={tmp_path / 'run'}", env=env)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [res.stderr.strip()], res.stderr
    assert res.stderr.startswith(f"error: {tree / 'train'} and {tree / 'val'} have different class folders (missing "
                                 f"from {tree / 'val'}: two): give both splits the same class folders")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_eval_labels_folders_by_name_through_the_weights_class_map(env, finetuned, five_classes, tmp_path):
    """Evaluated on a val folder without 'two', the other classes keep their labels: each class is scored exactly
    as in the evaluation on all five (sorted folder indices would have shifted 'three' and 'four' by one); and
    eval.py -m over two sources of the same model writes a row and a per-class folder for each."""
    run_dir, _ = finetuned
    tree = tmp_path / "four"
    shutil.copytree(five_classes / "val", tree / "val")
    shutil.rmtree(tree / "val" / "two")
    table = tmp_path / "table.md"
    args = ["model=mambavision_demo", "model.img_size=32", "data=imagenet_folder", "data.num_classes=5", *QUIET[:1]]
    res = run("eval.py", "-m", *args, f"table={table}", f"data.root={five_classes}",
              f"source={run_dir},{run_dir / 'checkpoints' / 'ema_last.pth'}", env=env)
    assert res.stdout.count("eval mambavision_demo top1") == 2
    rows = [ln for ln in table.read_text().splitlines() if ln.startswith("| mambavision_demo |")]
    assert len(rows) == 2
    full = {r["class"]: r for r in csv.DictReader(open(tmp_path / "table_mambavision_demo_run" / "per_class.csv"))}
    assert (tmp_path / "table_mambavision_demo_run_ema_last" / "per_class.csv").is_file()
    res = run("eval.py", *args, f"data.root={tree}", f"source={run_dir}", f"out_dir={tmp_path / 'four_out'}", "topk=3",
              env=env)
    top1, top5, top3 = map(float, re.search(r"^eval mambavision_demo top1 (\S+) top5 (\S+) top3 (\S+) balanced ",
                                            res.stdout, re.M).groups())
    assert top1 <= top3 <= top5, (top1, top3, top5)
    part = {r["class"]: r for r in csv.DictReader(open(tmp_path / "four_out" / "per_class.csv"))}
    assert part["two"]["images"] == "0" and part["two"]["accuracy"] == ""
    for name in ("zero", "one", "three", "four"):
        assert (part[name]["images"], part[name]["correct"]) == (full[name]["images"], full[name]["correct"]), name


@pytest.mark.slow
def test_predict_names_classes_skips_unreadable_images_and_refuses_bad_requests(env, finetuned, five_classes,
                                                                                tmp_path):
    run_dir, _ = finetuned
    photos = tmp_path / "photos"
    shutil.copytree(five_classes / "val" / "one", photos / "a")
    (photos / "a" / "broken.png").write_bytes(b"not a png")
    res = predict(str(run_dir), str(photos), "--topk", "2", "--out", str(tmp_path / "p.json"), "--workers", "1",
                  env=env)
    assert res.returncode == 0, res.stderr
    [warning] = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert warning.startswith(f"warning: skipped {photos / 'a' / 'broken.png'}: not a readable image")
    out = json.loads((tmp_path / "p.json").read_text())
    n = len(list((five_classes / "val" / "one").iterdir()))
    assert len(out) == n and all(len(r["top"]) == 2 for r in out) and f"({1} unreadable, skipped)" in res.stdout
    assert sum(r["top"][0]["class"] == "one" for r in out) > n * 0.7
    alone = tmp_path / "elsewhere" / "weights.pth"  # an exported EMA file away from its run: it names model and classes
    alone.parent.mkdir()
    shutil.copy(run_dir / "checkpoints" / "ema_last.pth", alone)
    res = predict(str(alone), str(photos / "a"), "--topk", "3", "--out", str(tmp_path / "p.csv"), "--workers", "1",
                  env=env)
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == n and "class_3" in rows[0] and "class_4" not in rows[0], rows[0]
    assert sum(r["class_1"] == "one" for r in rows) > n * 0.7
    from mambavision_train.predict import main
    for args, message in [((str(tmp_path / "nope"), str(photos)), "error: "),
                          (("mambavision_xl", str(photos)), "error: unknown model 'mambavision_xl'; choose one of"),
                          ((str(run_dir), str(tmp_path / "missing")), f"error: {tmp_path / 'missing'} does not exist"),
                          ((str(run_dir), str(photos), "--weights", "w.pth"), "error: --weights goes with a model name"),
                          ((str(run_dir), str(photos), "--out", "p.txt"), "error: --out p.txt: give a .csv or .json")]:
        with pytest.raises(SystemExit) as stop:  # before any model is built: in this process
            main(list(args))
        assert str(stop.value.code).startswith(message) and "\n" not in str(stop.value.code), (args, stop.value.code)


def test_resume_never_in_a_used_run_dir_is_refused_before_anything_is_written(env, five_steps, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(five_steps, run_dir)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    res = run_in_process("train.py", "experiment=demo", "data.kind=folder", "resume=never", f"run_dir={run_dir}",
                         env=env)
    assert res.returncode == 2 and res.stderr.startswith(f"error: resume=never, but {run_dir} already holds a run "
                                                         f"(checkpoints, metrics.jsonl)"), res.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_the_ema_warm_up_is_timms_and_a_horizon_longer_than_the_run_is_one_line():
    from types import SimpleNamespace

    import timm
    from timm.utils import ModelEmaV3

    from mambavision_train.engine.ema import EMA
    from mambavision_train.engine.trainer import Trainer
    model = timm.create_model("mambavision_demo")
    ours, theirs = EMA(model, 0.999, warmup=True), ModelEmaV3(model, decay=0.999, use_warmup=True)
    assert [ours.decay_at(t) for t in range(1, 3000)] == [theirs.get_decay(t) for t in range(1, 3000)]
    assert EMA(model, 0.999).decay_at(5) == 0.999
    lines = []
    stub = SimpleNamespace(cfg=SimpleNamespace(ema=SimpleNamespace(enabled=True, decay=0.9998, warmup=False)),
                           dist=SimpleNamespace(is_main=True), log=lines.append)
    Trainer.warn_if_the_ema_cannot_follow(stub, 90)
    assert lines == ["warning: ema.decay=0.9998 averages the last ~5000 optimizer steps but this run has 90: the EMA "
                     "weights (which select best.pth.tar and which eval.py evaluates) would stay close to the initial "
                     "ones; set ema.warmup=true or ema.decay=0.889"]
    stub.cfg.ema.warmup = True
    Trainer.warn_if_the_ema_cannot_follow(stub, 90)
    assert len(lines) == 1
