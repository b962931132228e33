"""Export for deployment (python -m mambavision_train.export): ONNX graphs that onnxruntime runs at any batch size and
image size with PyTorch's numbers, torch.export programs that load back with the scan operator in them, the
functional scan both are built from, and every bad request in one line before any work."""

import contextlib
import io
import json
import re
import shutil
import sys

import onnx
import onnxruntime as ort
import pytest
import timm
import torch

import mambavision_train  # noqa: F401  (registers the models and the scan operator)
from mambavision_train.export import load_source, trace_size
from mambavision_train.export.__main__ import main
from mambavision_train.models import load_pretrained
from mambavision_train.ops.selective_scan import torch_scan
from mambavision_train.ops.selective_scan.op import functional_selective_scan

from test_models import randomize_


def export(*argv):
    """``python -m mambavision_train.export *argv`` in this process: (exit code, stdout, stderr)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def onnxruntime_logits(path, x):
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def max_diff_at(path, model, shapes, seed=0):
    """The largest |logit difference| between the ONNX file (onnxruntime) and the eager model over random images of
    each shape; the top classes must agree."""
    gen, worst = torch.Generator().manual_seed(seed), 0.0
    for shape in shapes:
        x = torch.randn(shape, generator=gen)
        with torch.no_grad():
            want = model(x)
        got = onnxruntime_logits(path, x)
        assert got.shape == want.shape, shape
        assert torch.equal(got.argmax(1), want.argmax(1)), shape
        worst = max(worst, (got - want).abs().max().item())
    return worst


def eager(name, weights, **kwargs):
    return load_pretrained(timm.create_model(name, **kwargs), weights).eval()


@pytest.fixture(scope="module")
def run_onnx(five_steps, tmp_path_factory):
    """The demo run's EMA weights exported to ONNX by the command's defaults: (file, exit code, stdout, stderr)."""
    path = tmp_path_factory.mktemp("onnx") / "demo.onnx"
    return (path, *export(five_steps, "--out", path))


def test_a_run_exports_to_onnx_that_runs_at_any_batch_and_size(run_onnx, five_steps):
    """The run trained at 32 px (windows 8 8 2 1); its file is traced at another size (33x65) and must compute the
    model's logits at sizes whose padding and window counts differ from the traced ones: 32 px (no pad, one window),
    40x72 and 48x64 (padded, several windows), batches of 1 to 3."""
    path, code, out, err = run_onnx
    assert code == 0, err[-3000:]
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {path} ("), out
    assert "ONNX opset 20): images [batch, 3, height, width] -> logits [batch, 10]; checked: onnx.checker" in lines[0]
    assert "all in the standard domain; onnxruntime CPU vs PyTorch at 1x3x32x32, 3x3x32x32, 2x3x33x65" in lines[0]
    assert "argmax 6/6 equal" in lines[0]
    assert err.splitlines()[0] == f"source: mambavision_demo (10 classes, windows 8 8 2 1), EMA weights of {five_steps}"
    assert [p.name for p in path.parent.iterdir()] == ["demo.onnx"]  # one file, nothing partial left

    graph = onnx.load(str(path))
    assert {n.domain for n in graph.graph.node} == {""}  # standard ONNX only: no custom op, no function
    assert not graph.functions
    prep = json.loads({p.key: p.value for p in graph.metadata_props}["mambavision.preprocessing"])
    assert prep["res"] == 32 and prep["interpolation"] == "bicubic" and len(prep["mean"]) == 3

    model = eager("mambavision_demo", five_steps / "checkpoints" / "ema_last.pth", img_size=32)
    assert max_diff_at(path, model, [(2, 3, 32, 32), (1, 3, 40, 72), (3, 3, 48, 64)]) <= 1e-4


def test_the_stage_maps_export_equals_forward_intermediates(five_steps, tmp_path):
    """--features: the backbone's four stage maps (before each downsample, as timm's forward_intermediates gives
    them), named stage1..stage4, at a dynamic batch and size, as onnxruntime computes them."""
    path = tmp_path / "features.onnx"
    code, out, err = export(five_steps, "--out", path, "--features")
    assert code == 0, err[-3000:]
    assert "-> stage1 [batch, 32, " in out and ", stage4 [batch, 256, " in out, out
    model = eager("mambavision_demo", five_steps / "checkpoints" / "ema_last.pth", img_size=32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["stage1", "stage2", "stage3", "stage4"]
    for shape in ((1, 3, 32, 32), (3, 3, 48, 72)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            want = model.forward_intermediates(x, intermediates_only=True)
        got = session.run(None, {"images": x.numpy()})
        for a, b in zip(got, want):
            assert a.shape == tuple(b.shape) and (torch.from_numpy(a) - b).abs().max() <= 1e-4 * max(1, b.abs().max())


def test_a_static_file_at_another_opset_takes_exactly_its_shape(five_steps, tmp_path):
    path = tmp_path / "static.onnx"
    code, out, err = export(five_steps, "--out", path, "--static-batch", "2", "--static-size", "--img-size", "48", "40",
                            "--opset", "18")
    assert code == 0, err[-3000:]
    assert "ONNX opset 18): images [2, 3, 48, 40] -> logits [2, 10]; " in out and " at 2x3x48x40: " in out
    assert [o.version for o in onnx.load(str(path)).opset_import if o.domain == ""] == [18]
    model = eager("mambavision_demo", five_steps / "checkpoints" / "ema_last.pth", img_size=32)
    assert max_diff_at(path, model, [(2, 3, 48, 40)]) <= 1e-4
    for shape in ((1, 3, 48, 40), (2, 3, 48, 48)):
        with pytest.raises(Exception, match="[Ii]nvalid dimensions for input: images"):
            onnxruntime_logits(path, torch.randn(shape))


def test_pt2_round_trip_keeps_the_scan_operator(five_steps, tmp_path):
    """A model name with weights (a file in a run) as a torch.export program: loaded back, it calls
    torch.ops.mambavision.selective_scan (one node per Mamba mixer) and equals eager at any batch size."""
    weights = five_steps / "checkpoints" / "ema_last.pth"
    code, out, err = export("mambavision_demo", "--weights", weights, "--out", tmp_path / "demo.pt2")
    assert code == 0, err[-3000:]
    assert out.startswith(f"wrote {tmp_path / 'demo.pt2'} (") and "mambavision.selective_scan kept (2 calls)" in out
    assert "images [batch, 3, 64, 64] -> logits [batch, 10]" in out

    program = torch.export.load(str(tmp_path / "demo.pt2"))
    for graph in (program.graph, program.run_decompositions().graph):  # core ATen decomposes everything else
        assert sum(n.target is torch.ops.mambavision.selective_scan.default for n in graph.nodes) == 2
    model = eager("mambavision_demo", weights)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            assert (program.module()(x) - model(x)).abs().max() <= 1e-6


def test_a_checkpoint_of_a_run_is_the_model_the_run_trained(five_steps):
    """Its own config (last.pth.tar) or its run's (ema_last.pth): the 32 px windows, the EMA weights."""
    ema = torch.load(five_steps / "checkpoints" / "ema_last.pth", weights_only=True)["state_dict"]
    for name, described in (("last.pth.tar", "EMA weights"), ("ema_last.pth", "weights")):
        src = load_source(str(five_steps / "checkpoints" / name))
        assert src.name == "mambavision_demo" and src.weights == f"{described} of {five_steps / 'checkpoints' / name}"
        assert [lvl.window_size for lvl in src.model.levels] == [8, 8, 2, 1] and src.preprocessing["res"] == 32
        assert not src.model.training and all(torch.equal(src.model.state_dict()[k], v) for k, v in ema.items())


def test_functional_scan_equals_the_training_scan():
    """The scan ONNX gets (no in-place writes) against the one training runs, at lengths of one chunk, of whole
    chunks and with padding, with and without D and z; and its graph writes in place nowhere."""
    gen = torch.Generator().manual_seed(0)
    for seqlen, with_dz in ((1, False), (4, True), (16, False), (49, True), (50, False), (196, True)):
        b, d, n = 3, 6, 4
        u, delta, z = (torch.randn(b, d, seqlen, generator=gen) for _ in range(3))
        A = -torch.rand(d, n, generator=gen) - 0.5
        B, C = (torch.randn(b, n, seqlen, generator=gen) for _ in range(2))
        D, bias = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
        args = (u, delta, A, B, C, D if with_dz else None, z if with_dz else None, bias, True)
        want_y, want_last, _ = torch_scan.forward(*args)
        got_y, got_last, *_ = functional_selective_scan(*args, "torch")
        assert (got_y - want_y).abs().max() <= 1e-5 and (got_last - want_last).abs().max() <= 1e-5, seqlen
    graph = torch.fx.experimental.proxy_tensor.make_fx(functional_selective_scan)(*args, "torch").graph
    in_place = [str(node.target) for node in graph.nodes
                if node.op == "call_function" and node.target._schema.is_mutable]
    assert not in_place and len(graph.nodes) > 50, in_place


def test_trace_size_pads_every_windowed_stage_with_two_windows_or_more():
    with torch.device("meta"):
        t, demo32 = timm.create_model("mambavision_t"), timm.create_model("mambavision_demo", img_size=32)
    assert trace_size(t, 224, 224) == (225, 257)  # stage 3: 15 and 17 px for windows of 14; stage 4: 8 and 9 for 7
    assert trace_size(demo32, 32, 32) == (33, 65)  # windows 2 and 1: stage 3 3 and 5 px, stage 4 2 and 3


@pytest.fixture(scope="module")
def bare_run(five_steps, tmp_path_factory):
    """A run directory and a weights file that do not say enough: no exported EMA weights; a plain state dict
    outside a run (an exported EMA file names its variant; its bare weights do not)."""
    d = tmp_path_factory.mktemp("bad")
    (d / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(five_steps / "config.yaml", d / "run" / "config.yaml")
    torch.save(torch.load(five_steps / "checkpoints" / "ema_last.pth", weights_only=True)["state_dict"],
               d / "weights.pth")
    return d


BAD = [
    (["mambavision_x"], r"unknown model 'mambavision_x'; choose one of: mambavision_t, "),
    (["mambavision_demo", "--weights", "nothing.pth"], r"checkpoint not found: nothing\.pth "),
    (["runs/nothing"], r"not found: runs/nothing \(a run directory or weights file; or a model name"),
    (["{bare}/run"], r"\S+/run/checkpoints has no exported EMA weights \(ema_best\.pth / ema_last\.pth\) yet"),
    (["{bare}/weights.pth"], r"\S+weights\.pth holds weights but does not say which model they belong to: name it"),
    (["{run}", "--weights", "{bare}/weights.pth"], r"--weights goes with a model name; \S+ already holds weights"),
    (["mambavision_demo", "--out", "{tmp}/demo.tflite"], r"--out \S+demo\.tflite: name a \.onnx or \.pt2 file"),
    (["mambavision_demo", "--format", "tflite"], r"argument --format: invalid choice: 'tflite' \(choose from "),
    (["mambavision_demo", "--out", "{tmp}"], r"--out \S+ is a directory; give the file to write"),
    (["mambavision_demo", "--opset", "12"], r"--opset 12: torch's ONNX exporter writes opsets 18-23"),
    (["mambavision_demo", "--out", "{tmp}/demo.pt2", "--opset", "18"], r"--opset is for ONNX files"),
    (["mambavision_demo", "--out", "{tmp}/demo.pt2", "--dynamic-size"], r"--dynamic-size is for ONNX: "),
    (["mambavision_demo", "--img-size", "16", "64"], r"--img-size 16 64: each side at least 32 px"),
    (["mambavision_demo", "--static-batch", "0"], r"--static-batch 0: a batch size is at least 1"),
    (["mambavision_demo", "--static-batch", "2", "--dynamic-batch"], r"argument --dynamic-batch: not allowed with"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[f"{i}-{a[-1]}" for i, (a, _) in enumerate(BAD)])
def test_bad_requests_are_one_line_before_any_work(argv, message, bare_run, five_steps, tmp_path):
    argv = [a.format(bare=bare_run, run=five_steps, tmp=tmp_path) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "demo.onnx")]
    code, out, err = export(*argv)
    assert code == 2 and out == "", err
    assert len(err.splitlines()) == 1 and re.match(f"error: {message}", err), err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("impl", ["triton", "cuda", "mamba_ref"])
def test_a_scan_other_than_pytorch_is_refused(impl, monkeypatch, tmp_path):
    monkeypatch.setenv("MAMBAVISION_SCAN", impl)
    code, out, err = export("mambavision_demo", "--out", tmp_path / "demo.onnx")
    assert code == 2 and err == (f"error: MAMBAVISION_SCAN={impl}: the export traces the PyTorch scan (the graph must "
                                 "run anywhere); unset MAMBAVISION_SCAN or set it to torch\n")


def test_onnx_without_the_export_extra_says_what_to_install(monkeypatch, tmp_path):
    for name in ("onnxscript", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: find_spec says None
    code, out, err = export("mambavision_demo", "--out", tmp_path / "demo.onnx")
    assert code == 2 and err == ("error: ONNX export needs onnxscript, onnxruntime: "
                                 "pip install 'mambavision-train[export]'\n")


@pytest.mark.slow
def test_mambavision_t_exports_to_onnx_at_two_batch_sizes_and_resolutions(tmp_path):
    """MambaVision-T, every weight and statistic of order one (no branch hides behind a small value), exported with
    the defaults and run by onnxruntime at 224 px (no padding, one window in stages 3-4) and 200x264 (padded,
    several windows), batches of 1 and 2."""
    model = randomize_(timm.create_model("mambavision_t")).eval()
    torch.save(model.state_dict(), tmp_path / "t.pth")
    code, out, err = export("mambavision_t", "--weights", tmp_path / "t.pth", "--out", tmp_path / "t.onnx")
    assert code == 0, err[-3000:]
    assert "images [batch, 3, height, width] -> logits [batch, 1000]" in out and "argmax 6/6 equal" in out
    assert max_diff_at(tmp_path / "t.onnx", model, [(1, 3, 224, 224), (2, 3, 200, 264)]) <= 1e-3
