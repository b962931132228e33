"""Export a MambaVision model for deployment: an ONNX graph of standard ops (onnxruntime, TensorRT, ...) or a
torch.export program (``.pt2``: AOTInductor, ExecuTorch).

    python -m mambavision_train.export SOURCE --out PATH [--format onnx|pt2] [--img-size H W] [--weights FILE]
        [--dynamic-batch | --static-batch [N]] [--dynamic-size | --static-size] [--opset N] [--features]

SOURCE: a model name (with --weights: any file or Hugging Face repo load_pretrained takes; without, random init),
a run directory of train.py (its EMA weights), or one of its checkpoints (models/loading.py). The classifier (with
--features: the four stage maps of the backbone) is exported in eval mode,
by default with a dynamic batch and (ONNX) a dynamic height and width, checked at the variant's own resolution.
Nothing is written unless the file passes its checks (docs/export.md): ONNX through onnx.checker, standard ops
only and onnxruntime against PyTorch at two batch sizes and a second padding; pt2 loaded back and run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from ..log import say
from ..errors import CheckpointError
from ..ops.selective_scan import ENV_VAR
from . import onnx_graph
from ..models.loading import load_source
from ..errors import ExportError
from .tracing import INPUT, CheckFailed, check_pt2, custom_op_calls, dim_names, input_shape, target, trace, trace_size

FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
TOLERANCE = 1e-4  # of an output's magnitude (at least 1): far above fp32 rounding, far below any real difference
MIN_SIDE = 32  # the network's stride: the last stage sees one pixel
OPSETS_TEXT = f"{onnx_graph.OPSETS.start}-{onnx_graph.OPSETS.stop - 1}"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other bad request (argparse prints the usage first)
        say(f"error: {message} (see {self.prog} --help)")
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m mambavision_train.export", description=" ".join(__doc__.split("\n\n")[0].split()),
                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.splitlines()[5:]))
    ap.add_argument("source", metavar="SOURCE", help="model name, run directory or checkpoint")
    ap.add_argument("--out", required=True, type=Path, help="the file to write (.onnx or .pt2)")
    ap.add_argument("--format", choices=sorted(set(FORMATS.values())),
                    help="onnx or pt2 (default: the --out suffix)")
    ap.add_argument("--weights", help="with a model name: the weights (a file, run directory or HF repo)")
    ap.add_argument("--img-size", nargs=2, type=int, metavar=("H", "W"),
                    help="the input size checked (and fixed, with --static-size); default: the variant's own")
    batch = ap.add_mutually_exclusive_group()
    batch.add_argument("--dynamic-batch", dest="static_batch", action="store_const", const=None,
                       help="any batch size (default)")
    batch.add_argument("--static-batch", type=int, nargs="?", const=1, metavar="N",
                       help="a fixed batch size (default 1)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--dynamic-size", dest="static_size", action="store_false", default=None,
                      help="any height and width (ONNX default)")
    size.add_argument("--static-size", dest="static_size", action="store_true",
                      help="the height and width fixed at --img-size (pt2 always)")
    ap.add_argument("--opset", type=int, help=f"ONNX opset, {OPSETS_TEXT} (default: torch's, 20)")
    ap.add_argument("--features", action="store_true",
                    help="export the backbone's four stage maps (stage1..stage4, before each downsample) instead of "
                         "the logits")
    return ap


def check_request(args) -> str:
    """Every bad request, in one line, before any work; returns the format."""
    if args.out.is_dir():
        raise ExportError(f"--out {args.out} is a directory; give the file to write, e.g. {args.out / 'model.onnx'}")
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--out {args.out}: cannot create {args.out.parent} ({e.strerror})") from None
    if not os.access(args.out.parent, os.W_OK):
        raise ExportError(f"--out {args.out}: {args.out.parent} is not writable")
    fmt = args.format or FORMATS.get(args.out.suffix)
    if fmt is None:
        raise ExportError(f"--out {args.out}: name a .onnx or .pt2 file, or give --format onnx|pt2")
    if args.img_size and min(args.img_size) < MIN_SIDE:
        raise ExportError(f"--img-size {args.img_size[0]} {args.img_size[1]}: each side at least {MIN_SIDE} px "
                          "(the network's stride)")
    if args.static_batch is not None and args.static_batch < 1:
        raise ExportError(f"--static-batch {args.static_batch}: a batch size is at least 1")
    if fmt == "pt2" and args.static_size is False:
        raise ExportError("--dynamic-size is for ONNX: a torch.export program keeps the guards of the size it was "
                          "traced at (docs/export.md); export a .pt2 per size with --img-size")
    if fmt == "pt2" and args.opset is not None:
        raise ExportError("--opset is for ONNX files; a .pt2 has none")
    if args.opset is not None and args.opset not in onnx_graph.OPSETS:
        raise ExportError(f"--opset {args.opset}: torch's ONNX exporter writes opsets {OPSETS_TEXT}")
    if os.environ.get(ENV_VAR, "auto") not in ("auto", "torch"):
        raise ExportError(f"{ENV_VAR}={os.environ[ENV_VAR]}: the export traces the PyTorch scan (the graph must run "
                          f"anywhere); unset {ENV_VAR} or set it to torch")
    missing = onnx_graph.missing_packages() if fmt == "onnx" else []
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}: {onnx_graph.EXPORT_EXTRA}")
    return fmt


def _shape(shape, dims) -> str:
    return "[" + ", ".join(dims.get(str(d), str(d)) for d in shape) + "]"


def signature(ep, tgt, dims) -> str:
    """images [batch, 3, height, width] -> logits [batch, 10]"""
    out = next(n for n in ep.graph.nodes if n.op == "output").args[0]
    shapes = [_shape(o.meta["val"].shape, dims) for o in out]
    return f"{INPUT} {_shape(input_shape(ep), dims)} -> " + ", ".join(
        f"{name} {s}" for name, s in zip(tgt.outputs, shapes))


def _megabytes(paths) -> str:
    return f"{sum(p.stat().st_size for p in paths) / 1e6:.1f} MB"


def export(args, fmt: str) -> str:
    """Write the file the request asks for into place, checked; returns the summary line."""
    src = load_source(args.source, args.weights, official_weights=False, scan_impl="torch")
    res = src.preprocessing["res"]
    size = tuple(args.img_size) if args.img_size else (res, res)
    static_size = fmt == "pt2" or bool(args.static_size)
    dynamic_batch = args.static_batch is None
    say(f"source: {src.name} ({src.model.num_classes} classes, windows "
        f"{' '.join(str(lvl.window_size) for lvl in src.model.levels)}), {src.weights}")

    tgt = target(src.model, features=args.features)
    at = size if static_size else trace_size(src.model, *size)
    batch = args.static_batch or 2  # two or more: torch.export specialises a size of 1
    dynamic = [d for d, on in (("batch", dynamic_batch), ("height, width", not static_size)) if on]
    say(f"tracing at {batch}x3x{at[0]}x{at[1]} with torch.export ({', '.join(dynamic) or 'static'})")
    ep = trace(tgt, batch, at, dynamic_batch, not static_size)
    dims = dim_names(ep)
    batches = [args.static_batch] if not dynamic_batch else [1, 3]
    shapes = [(b, 3, *size) for b in batches] + ([(batch, 3, *at)] if not static_size else [])
    metadata = {"mambavision.model": src.name, "mambavision.weights": src.weights,
                "mambavision.preprocessing": json.dumps(src.preprocessing)}

    out = args.out
    partial = out.parent / f".{out.name}.partial"  # checked there, then moved into place: no unchecked file
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        if fmt == "onnx":
            say(f"writing ONNX (opset {args.opset or 'default'}), then checking it: onnx.checker, op domains, "
                f"onnxruntime at {', '.join('x'.join(map(str, s)) for s in shapes)}")
            onnx_graph.write_onnx(ep, partial / out.name, args.opset, tgt, dims, metadata)
            check = onnx_graph.check_onnx(partial / out.name, tgt, shapes, TOLERANCE)
            kind = f"ONNX opset {check.opset}"
        else:
            say(f"writing the ExportedProgram, then loading it back and running it at "
                f"{', '.join('x'.join(map(str, s)) for s in shapes)}")
            torch.export.save(ep, str(partial / out.name), extra_files={"mambavision.json": json.dumps(metadata)})
            compared = check_pt2(partial / out.name, tgt, shapes, TOLERANCE)
            check = f"torch.export.load, then run against eager PyTorch {compared}"
            kind = f"torch.export, mambavision.selective_scan kept ({custom_op_calls(ep)} calls)"
        written = sorted(partial.iterdir())
        for f in written:
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    files = [out.parent / f.name for f in written]
    extra = f" + {', '.join(f.name for f in files if f != out)}" if len(files) > 1 else ""
    return f"wrote {out}{extra} ({_megabytes(files)}, {kind}): {signature(ep, tgt, dims)}; checked: {check}"


def main(argv=None):
    args = parser().parse_args(argv)
    args.out = args.out.expanduser()
    try:
        print(export(args, check_request(args)), flush=True)
    except (ExportError, CheckpointError) as e:
        say(f"error: {e}")
        sys.exit(2)
    except CheckFailed as e:
        say(f"error: check failed, nothing written: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
