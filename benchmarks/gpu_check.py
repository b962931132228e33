"""The GPU check: correctness of the scan and the model on CUDA, then img/s of T, S and B per scan implementation.

    bash benchmarks/gpu_check.sh            # runs from the source tree: needs only torch and timm (+ mamba_ssm if any)

1. The scan on CUDA (fp32 and bf16 inputs) against a float64 per-step loop: forward and every input gradient.
2. MambaVision-T on CUDA (each available scan) against the same weights on the CPU: max |logit difference|.
3. Inference and training img/s for T, S, B at 224 px, batch 128, bf16, channels_last, every available scan.
Prints one table; about 3-6 minutes on an H100. ``--quick`` shrinks everything (a smoke run on any device).
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
import torch.nn.functional as F

import mambavision_train  # noqa: F401
from mambavision_train.ops.selective_scan import available_impls, selective_scan
from throughput import measure


def naive_scan(u, delta, A, B, C, D, delta_bias):
    delta = F.softplus(delta.double() + delta_bias.double()[:, None])
    u, A, B, C = u.double(), A.double(), B.double(), C.double()
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float64, device=u.device)
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, -1) + D.double()[:, None] * u


def scan_errors(impl, shape, dtype, device):
    b, d, l = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g)).to(device, dtype).requires_grad_()
    x = dict(u=mk(b, d, l), delta=mk(b, d, l, scale=0.5),
             A=(-torch.rand(d, 8, generator=g) * 4 - 0.1).to(device).requires_grad_(), B=mk(b, 8, l), C=mk(b, 8, l),
             D=mk(d), delta_bias=mk(d, scale=0.3))
    gout = torch.randn(b, d, l, generator=g).to(device)
    out = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], delta_bias=x["delta_bias"],
                         delta_softplus=True, impl=impl)
    got = [out] + list(torch.autograd.grad(out, list(x.values()), gout.to(out.dtype)))
    ref_in = {k: v.detach().to(torch.float32 if v.dtype != torch.float32 else v.dtype).requires_grad_() for k, v in x.items()}
    ref = naive_scan(**ref_in)
    want = [ref] + list(torch.autograd.grad(ref, list(ref_in.values()), gout.double()))
    return max(((a.double() - w.double()).abs().max() / w.double().abs().max()).item() for a, w in zip(got, want))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run on any device")
    args = ap.parse_args()
    device = torch.device(args.device)
    impls = [i for i in available_impls() if i != "mamba_ref"] if device.type == "cuda" else ["torch"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"# gpu_check on {name}, torch {torch.__version__}, scans: {', '.join(impls)}", flush=True)
    rows = []
    shapes = [(2, 16, 20)] if args.quick else [(8, 160, 196), (8, 320, 49)]
    for impl in impls:
        for shape in shapes:
            for dtype in (torch.float32, torch.bfloat16):
                err = scan_errors(impl, shape, dtype, device)
                tol = 1e-4 if dtype == torch.float32 else 3e-2
                rows.append(("scan vs float64 loop", impl, f"{shape} {str(dtype)[6:]}", f"max rel err {err:.1e}",
                             "ok" if err < tol else "FAIL"))
    torch.manual_seed(0)
    res = 64 if args.quick else 224
    model_name = "mambavision_demo" if args.quick else "mambavision_t"
    cpu_model = timm.create_model(model_name, scan_impl="torch").eval()
    x = torch.randn(2, 3, res, res)
    with torch.no_grad():
        want = cpu_model(x)
        for impl in impls:
            m = timm.create_model(model_name, scan_impl=impl).eval().to(device)
            m.load_state_dict(cpu_model.state_dict())
            err = (m(x.to(device)).float().cpu() - want).abs().max().item()
            rows.append((f"{model_name} logits vs CPU fp32", impl, f"{res} px fp32", f"max abs diff {err:.1e}",
                         "ok" if err < 1e-3 else "FAIL"))
    models = ["mambavision_demo"] if args.quick else ["mambavision_t", "mambavision_s", "mambavision_b"]
    batch, warm, iters = (8, 1, 2) if args.quick else (128, 10, 40)
    for model in models:
        for mode in ("infer", "train"):
            for impl in impls:
                t0 = time.perf_counter()
                ips = measure(model, mode, batch, res, "bf16", impl, warm if mode == "infer" else max(1, warm // 2),
                              iters if mode == "infer" else max(2, iters // 2), device)
                rows.append((f"{model} {mode} img/s", impl, f"batch {batch}, bf16", f"{ips:.0f}",
                             f"{time.perf_counter() - t0:.0f} s"))
    print("| check | scan | setting | result | status |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if any(r[4] == "FAIL" for r in rows):
        raise SystemExit("gpu_check: FAILED")


if __name__ == "__main__":
    main()
