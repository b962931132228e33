"""Inference of MambaVision-T on the CPU three ways, side by side: PyTorch eager, torch.compile (inductor) and
onnxruntime running the file ``python -m mambavision_train.export`` writes.

    python benchmarks/export.py [--model mambavision_t] [--res 224] [--batches 1 32] [--threads 2] [--repeats 5]
        [--onnx FILE]

Same weights everywhere (random, seeded), fp32, no grad. The ONNX file is exported here with the command's
defaults (dynamic batch and size) unless --onnx names one; compile and export times are reported, not timed.
Runs interleaved (eager, inductor, onnxruntime, eager, ...), median seconds per batch.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

import mambavision_train  # noqa: F401
from common import interleaved, machine
from mambavision_train.export.__main__ import main as export_main
from mambavision_train.models.loading import load_source


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mambavision_t")
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--onnx", type=Path, help="an exported file of --model with these weights (default: export)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_source(args.model, official_weights=False).model  # random weights: nothing to download
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pth"
        torch.save(model.state_dict(), weights)
        onnx_file = args.onnx
        if onnx_file is None:
            onnx_file, t0 = Path(tmp) / "model.onnx", time.perf_counter()
            export_main([args.model, "--weights", str(weights), "--out", str(onnx_file)])
            print(f"# export: {time.perf_counter() - t0:.0f} s")
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        # Its threads otherwise spin-wait after each run and take the cores from the next method's run (eager at
        # batch 1 measured 12x slower interleaved with onnxruntime than alone).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        compiled = torch.compile(model)

        print(f"# {args.model}, {args.res} px, fp32, {machine()}, onnxruntime {ort.__version__}")
        print("| batch | eager img/s | torch.compile (inductor) img/s | onnxruntime img/s | inductor / eager | "
              "onnxruntime / eager |")
        print("|---|---|---|---|---|---|")
        compile_times = []
        for batch in args.batches:
            x = torch.randn(batch, 3, args.res, args.res)
            feed = {"images": x.numpy()}
            with torch.inference_mode():
                t0 = time.perf_counter()
                compiled(x)  # compiles for this batch size
                compile_times.append(f"batch {batch} {time.perf_counter() - t0:.0f} s")
                t = interleaved({"eager": lambda: model(x), "inductor": lambda: compiled(x),
                                 "onnxruntime": lambda: session.run(None, feed)}, repeats=args.repeats)
            ips = {k: batch / v for k, v in t.items()}
            print(f"| {batch} | {ips['eager']:.1f} | {ips['inductor']:.1f} | {ips['onnxruntime']:.1f} | "
                  f"{ips['inductor'] / ips['eager']:.2f}x | {ips['onnxruntime'] / ips['eager']:.2f}x |")
        print(f"# torch.compile: {', '.join(compile_times)}")


if __name__ == "__main__":
    main()
