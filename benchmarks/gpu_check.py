"""The GPU check: correctness of every scan on CUDA, their speed, model img/s, and the real training path end to end.

    bash benchmarks/gpu_check.sh            # from the source tree: torch, timm and triton (+ .whl/ for train.py)

1. Each scan on CUDA (fp32 and bf16 inputs, with and without z) against a float64 per-step loop: forward and every
   input gradient. MambaVision-T on CUDA against the same weights on the CPU.
2. Scan forward+backward time at the MambaVision-T/B stage-3 and stage-4 shapes, batch 128, bf16 inputs; the bytes
   the scan must move at least, over that time, as a fraction of the HBM bandwidth measured by a device copy. A few
   Triton kernel configurations at the T stage-3 shape.
3. Inference and training img/s of T, S, B at 224 px, batch 128, bf16 autocast, channels_last, per scan; then T
   with torch.compile.
4. The trainer on the device (gpu_trainer.py): host-device syncs per optimizer step and per augmented batch (CUDA's
   sync debug mode), ``deterministic=true`` runs equal bit for bit, ``ema_last.pth`` loading without a GPU, and where
   FFCV is installed and there are 2+ GPUs, which GPUs a rank on GPU 1 holds a context on.
5. ``train.py experiment=demo`` for one epoch on CUDA (bf16, paper augmentation: Mixup/CutMix and erasing on the
   device, folder loader) in a fresh run directory, then ``eval.py`` on its checkpoint.
Every row is printed as it is measured (a run cut short keeps what it had), and the table again at the end.
Sections that would overrun the time budget are skipped with a line saying so. ``--quick``: tiny sizes, any device.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A smoke run on the CPU (--device cpu) runs the Triton kernels in Triton's interpreter, which must be chosen before
# triton is first imported (torch's FLOP counter imports it with torch).
if "cpu" in sys.argv[sys.argv.index("--device") + 1:][:1]:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import timm
import torch
import torch.nn.functional as F

import mambavision_train  # noqa: F401
from mambavision_train.ops.selective_scan import available_impls, selective_scan
from throughput import measure

ROOT = Path(__file__).resolve().parents[1]
ROWS: list[tuple] = []
START = time.perf_counter()


HEAD = "| check | scan | setting | result | status |\n|---|---|---|---|---|\n"


def row(*cells):
    """Print a row and rewrite $OUT/gpu_check.md with every row so far: a run cut short keeps its table."""
    ROWS.append(tuple(str(c) for c in cells))
    print("| " + " | ".join(ROWS[-1]) + " |", flush=True)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"], "gpu_check.md")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(HEAD + "".join("| " + " | ".join(r) + " |\n" for r in ROWS))
        path.with_suffix(".tmp").replace(path)


def naive_scan(u, delta, A, B, C, D, z, delta_bias):
    delta = F.softplus(delta.double() + delta_bias.double()[:, None])
    u, A, B, C = u.double(), A.double(), B.double(), C.double()
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float64, device=u.device)
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1) + D.double()[:, None] * u
    return y if z is None else y * F.silu(z.double())


def scan_inputs(b, d, l, n, dtype, device, with_z=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g)).to(device, dtype).requires_grad_()
    return dict(u=mk(b, d, l), delta=mk(b, d, l, scale=0.5),
                A=(-torch.rand(d, n, generator=g) * 4 - 0.1).to(device).requires_grad_(), B=mk(b, n, l),
                C=mk(b, n, l), D=torch.randn(d, generator=g).to(device).requires_grad_(),
                z=mk(b, d, l) if with_z else None,
                delta_bias=(0.3 * torch.randn(d, generator=g)).to(device).requires_grad_())


def scan_errors(impl, shape, dtype, device, with_z):
    x = scan_inputs(*shape, 8, dtype, device, with_z)
    leaves = [v for v in x.values() if v is not None]
    gout = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    out = selective_scan(**x, delta_softplus=True, impl=impl)
    got = [out] + list(torch.autograd.grad(out, leaves, gout.to(out.dtype)))
    ref_in = {k: None if v is None else v.detach().float().requires_grad_() for k, v in x.items()}
    ref = naive_scan(**ref_in)
    want = [ref] + list(torch.autograd.grad(ref, [v for v in ref_in.values() if v is not None], gout.double()))
    return max(((a.double() - w).abs().max() / w.abs().max()).item() for a, w in zip(got, want))


def bench_ms(fn) -> float:
    """Median milliseconds per call: CUDA events via triton's do_bench on a GPU, one timed call elsewhere."""
    if torch.cuda.is_available():
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def copy_bandwidth(device, numel=2 ** 29) -> float:
    """Bytes read + written per second by a large device-to-device copy: the HBM ceiling we can reach."""
    src = torch.empty(numel, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / (bench_ms(lambda: dst.copy_(src)) / 1e3)


def scan_bytes(b, d, l, n, elem=2, partial_blocks=0) -> int:
    """The least a fused forward+backward must move: forward reads u, delta, B, C and writes y; backward reads them
    again with dy and writes du, ddelta, dB, dC (A, D, bias and the checkpoints are small). ``partial_blocks``: our
    Triton backward writes dB and dC as fp32 partial sums, one per block of channels (b, d / block_d, n, l), and
    PyTorch reads them back to add them up (no atomics: bit-reproducible); at block_d 4 that is about twice the
    minimum again, so the minimum over (minimum + partials) is that kernel's real ceiling."""
    big, small = b * d * l * elem, b * n * l * elem
    partials = 2 * 2 * b * partial_blocks * n * l * 4  # dB and dC: written by the kernel, read by the sum
    return (2 * big + 2 * small + big) + (3 * big + 2 * small + 2 * big + 2 * small) + partials


def triton_blocks(d, l, n):
    from mambavision_train.ops.selective_scan import triton_scan
    return -(-d // triton_scan.default_config(n, l).block_d)


def time_scan(impl, shape, device, config=None):
    x = scan_inputs(*shape, torch.bfloat16, device)
    leaves = [v for v in x.values() if v is not None]
    gout = torch.randn(shape[:3], device=device, dtype=torch.bfloat16)
    if config is None:
        fn = lambda: torch.autograd.grad(selective_scan(**x, delta_softplus=True, impl=impl), leaves, gout)
    else:  # the Triton kernels directly, with a given configuration
        from mambavision_train.ops.selective_scan import triton_scan
        args = [x[k].detach() for k in ("u", "delta", "A", "B", "C", "D")] + [None, x["delta_bias"].detach(), True]

        def fn():
            out, last, ckpt = triton_scan.forward(*args, config=config)
            triton_scan.backward(gout, *args, ckpt, config=config)
    return bench_ms(fn)


def section(name, budget_s, limit_s):
    left = limit_s - (time.perf_counter() - START)
    if left < budget_s:
        row(name, "-", "-", f"skipped: {left:.0f} s left, needs ~{budget_s} s", "SKIP")
        return False
    print(f"# {name} (t = {time.perf_counter() - START:.0f} s)", flush=True)
    return True


class guarded:
    """A section that fails becomes a FAIL row (with its traceback printed), and the check goes on."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if kind is not None and issubclass(kind, Exception):
            import traceback
            traceback.print_exception(kind, err, tb)
            row(self.name, "-", "-", f"{kind.__name__}: {str(err)[:80]}", "FAIL")
            return True


def run(cmd, env, timeout):
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    print("\n".join((res.stdout + res.stderr).strip().splitlines()[-15:]), flush=True)
    return res, time.perf_counter() - t0


def end_to_end(device, limit):
    """train.py on the demo for one epoch on the GPU, then eval.py on its checkpoint."""
    try:
        import hydra  # noqa: F401
    except ImportError:
        row("train.py + eval.py end to end", "-", "-", "hydra-core missing (bring .whl/, see gpu_check.sh)", "SKIP")
        return
    out = Path(tempfile.mkdtemp(prefix="gpu_check_e2e_"))  # fresh: a rerun must train, not resume a finished run
    env = dict(os.environ, MAMBAVISION_CACHE=str(out / "cache"), WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    run_dir = out / "run"
    scan = "triton" if device.startswith("cuda") else "torch"  # the interpreter would take an hour on a CPU
    res, secs = run([sys.executable, "train.py", "experiment=demo", f"device={device}", "amp=bf16", "aug=paper",
                     "data.kind=folder", "epochs=1", "sched.warmup_epochs=0", "logger.mode=disabled",
                     f"model.scan_impl={scan}", f"run_dir={run_dir}"], env, timeout=limit)
    ips = [ln.split("|")[2].strip() for ln in res.stdout.splitlines() if ln.startswith("| train images/s")]
    row("train.py experiment=demo, 1 epoch", scan, "bf16, aug=paper, folder loader",
        f"exit {res.returncode}, {ips[0] if ips else '?'} img/s", f"ok ({secs:.0f} s)" if res.returncode == 0 else "FAIL")
    ckpt = run_dir / "checkpoints" / "last.pth.tar"
    res, secs = run([sys.executable, "eval.py", "model=mambavision_demo", "model.img_size=32", f"source={ckpt}",
                     "data=digits", "data.kind=folder", f"device={device}", "amp=bf16"], env, timeout=120)
    top1 = [ln for ln in (res.stdout + res.stderr).replace("\r", "\n").splitlines() if " top1 " in ln]
    row("eval.py on its checkpoint", "auto", "bf16, folder loader", top1[-1][-60:] if top1 else f"exit {res.returncode}",
        f"ok ({secs:.0f} s)" if res.returncode == 0 else "FAIL")


def trainer_checks(device: str):
    """benchmarks/gpu_trainer.py: syncs per step and per augmented batch, determinism, the EMA file, FFCV's thread."""
    try:
        import hydra  # noqa: F401
    except ImportError:
        row("trainer on the device", "-", "-", "hydra-core missing (bring .whl/, see gpu_check.sh)", "SKIP")
        return
    import gpu_trainer
    os.environ.setdefault("MAMBAVISION_CACHE", tempfile.mkdtemp(prefix="gpu_check_cache_"))
    checks = [gpu_trainer.determinism] + ([gpu_trainer.syncs, lambda d: gpu_trainer.ffcv_contexts()]
                                          if device.startswith("cuda") else [])
    for check in checks:
        with guarded(f"trainer: {getattr(check, '__name__', 'ffcv')}"):
            for r in check(device):
                row(*r)


def correctness(impls, device, q):
    for impl in impls:
        for shape, dtype, with_z in [((2, 16, 20) if q else (8, 160, 196), torch.float32, False),
                                     ((2, 16, 20) if q else (8, 160, 196), torch.bfloat16, False),
                                     ((2, 9, 37) if q else (3, 37, 1031), torch.float32, True)]:
            err = scan_errors(impl, shape, dtype, device, with_z)
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            row("scan vs float64 loop", impl, f"{shape} {str(dtype)[6:]}{' +z' if with_z else ''}",
                f"max rel err {err:.1e}", "ok" if err < tol else "FAIL")
    torch.manual_seed(0)
    res, model_name = (64, "mambavision_demo") if q else (224, "mambavision_t")
    cpu_model = timm.create_model(model_name, scan_impl="torch").eval()
    x = torch.randn(2, 3, res, res)
    with torch.no_grad():
        want = cpu_model(x)
        for impl in impls:
            m = timm.create_model(model_name, scan_impl=impl).eval().to(device)
            m.load_state_dict(cpu_model.state_dict())
            err = (m(x.to(device)).float().cpu() - want).abs().max().item()
            row(f"{model_name} logits vs CPU fp32", impl, f"{res} px fp32", f"max abs diff {err:.1e}",
                "ok" if err < 1e-3 else "FAIL")


def scan_speed(impls, device, q):
    peak = copy_bandwidth(device, 2 ** 16 if q else 2 ** 29)
    row("device copy bandwidth (read + write)", "-", "fp16 copy", f"{peak / 1e12:.3f} TB/s", "ceiling")
    shapes = {"T stage 3": (128, 160, 196, 8), "T stage 4": (128, 320, 49, 8),
              "B stage 3": (128, 256, 196, 8), "B stage 4": (128, 512, 49, 8)}
    if q:
        shapes = {"tiny": (1, 8, 20, 8)}
    for label, shape in shapes.items():
        for impl in impls:
            ms = time_scan(impl, shape, device)
            frac = scan_bytes(*shape) / (ms / 1e3) / peak
            note = ""
            if impl == "triton":  # what it really moves, partial sums included, and so its ceiling
                real = scan_bytes(*shape, partial_blocks=triton_blocks(*shape[1:]))
                note = (f"; {100 * real / (ms / 1e3) / peak:.0f}% counting its partial sums "
                        f"(ceiling {100 * scan_bytes(*shape) / real:.0f}%)")
            row(f"scan fwd+bwd, {label}", impl, f"{shape[:3]} bf16", f"{ms:.3f} ms",
                f"{100 * frac:.0f}% of copy BW{note}")
    if "triton" in impls:
        from mambavision_train.ops.selective_scan.triton_scan import KernelConfig
        label, shape = next(iter(shapes.items()))
        for cfg in [KernelConfig(4, 32, 1), KernelConfig(8, 32, 2), KernelConfig(4, 16, 1), KernelConfig(8, 16, 1),
                    KernelConfig(16, 32, 4), KernelConfig(2, 32, 1)][:2 if q else None]:
            with guarded(f"triton config {cfg}"):
                ms = time_scan("triton", shape, device, cfg)
                frac = scan_bytes(*shape) / (ms / 1e3) / peak
                row(f"triton config, {label}", f"block_d {cfg.block_d}, chunk {cfg.chunk}, warps {cfg.num_warps}",
                    f"{shape[:3]} bf16", f"{ms:.3f} ms", f"{100 * frac:.0f}% of copy BW")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run on any device")
    ap.add_argument("--limit", type=float, default=450, help="seconds; later sections are skipped past it")
    ap.add_argument("--sections", default="correctness,scan,models,trainer,e2e,compile")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    impls = [i for i in available_impls() if i != "mamba_ref"] if cuda else ["torch", "triton"]
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"# gpu_check on {name}, torch {torch.__version__}, scans: {', '.join(impls)}", flush=True)
    print("| check | scan | setting | result | status |\n|---|---|---|---|---|", flush=True)
    q, todo = args.quick, args.sections.split(",")
    res = 64 if q else 224
    models = ["mambavision_demo"] if q else ["mambavision_t", "mambavision_s", "mambavision_b"]
    batch, warm, iters = (8, 1, 2) if q else (128, 5, 20)
    best = "triton" if "triton" in impls else "torch"

    if "correctness" in todo:
        with guarded("correctness"):
            correctness(impls, device, q)
    if "scan" in todo and section("scan speed", 60, args.limit):
        with guarded("scan speed"):
            scan_speed(impls, device, q)
    if "models" in todo and section("model img/s", 90, args.limit):
        for model in models:
            for mode in ("infer", "train"):
                for impl in impls:
                    with guarded(f"{model} {mode} {impl}"):
                        t0 = time.perf_counter()
                        ips = measure(model, mode, batch, res, "bf16", impl, warm, iters, device)
                        row(f"{model} {mode} img/s", impl, f"batch {batch}, bf16", f"{ips:.0f}",
                            f"{time.perf_counter() - t0:.0f} s")
    if "trainer" in todo and section("trainer on the device", 90, args.limit):
        trainer_checks(args.device)
    if "e2e" in todo and section("end to end", 90, args.limit):
        with guarded("end to end"):
            end_to_end(args.device, max(60, args.limit - (time.perf_counter() - START) - 60))
    for mode in ("infer", "train"):  # last: compiling takes the longest
        if "compile" in todo and section(f"compile {mode}", 100, args.limit):
            with guarded(f"compile {mode}"):
                t0 = time.perf_counter()
                ips = measure(models[0], mode, batch, res, "bf16", best, warm, iters, device, compile=True)
                row(f"{models[0]} {mode} img/s, torch.compile", best, f"batch {batch}, bf16", f"{ips:.0f}",
                    f"{time.perf_counter() - t0:.0f} s incl. compiling")

    print(f"\n# gpu_check on {name}: {time.perf_counter() - START:.0f} s\n")
    print("| check | scan | setting | result | status |\n|---|---|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")
    if any(r[4] == "FAIL" for r in ROWS):
        raise SystemExit("gpu_check: FAILED")


if __name__ == "__main__":
    main()
