"""The Triton scan (scan_impl=triton): the same numbers as the float64 loop, mamba_ssm's reference and our PyTorch
scan. Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py), so shapes
stay small; the GPU check (benchmarks/gpu_check.sh) runs them compiled."""

import subprocess
import sys

import pytest
import timm
import torch

from mambavision_train.ops.selective_scan import resolve_impl, selective_scan
from helpers.scan_reference import grads, make_inputs, naive_scan, rel_err
from helpers.runs import ROOT

pytest.importorskip("triton", reason="Triton ships with every CUDA build of torch and with our dev install")
from mambavision_train.ops.selective_scan import triton_scan  # noqa: E402

NAMES = ["out", "u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def check_against_loop(x, softplus, tol=1e-5):
    """Forward and every input gradient of the Triton scan against the float64 loop and mamba_ssm's reference."""
    gout = torch.randn(x["u"].shape, generator=torch.Generator().manual_seed(1))
    ours = grads(lambda **a: selective_scan(**a, impl="triton"), x, gout, softplus)
    names = ["out"] + [k for k, v in x.items() if v is not None]
    for reference in (naive_scan, lambda **a: selective_scan(**a, impl="mamba_ref")):
        errors = {name: rel_err(a, b) for name, a, b in zip(names, ours, grads(reference, x, gout, softplus))}
        assert max(errors.values()) < tol, errors
    assert ours[0].dtype == x["u"].dtype


@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("with_z,with_D,with_bias", [(True, True, True), (False, False, False), (False, True, True),
                                                     (True, False, False)])
def test_options_match_the_float64_loop(with_z, with_D, with_bias, softplus):
    x = make_inputs(2, 6, 40, 8, with_z, with_D, with_bias)
    if not softplus:  # delta is a step size: without softplus it must come positive, or the state blows up
        x["delta"] = x["delta"].detach().abs().requires_grad_()
    check_against_loop(x, softplus)


@pytest.mark.parametrize("seqlen", [1, 7, 49, 196, 1031])
def test_sequence_lengths(seqlen):
    # 1031 = 32 chunks + 7 steps (d = 4: one program, the interpreter's time goes by programs x steps).
    check_against_loop(make_inputs(1, 5 if seqlen < 1000 else 4, seqlen, 8, True, True, True, seed=seqlen), True)


@pytest.mark.parametrize("config", [dict(block_d=2, chunk=8), dict(block_d=8, chunk=16, num_warps=2),
                                    dict(block_d=16, chunk=64, num_warps=4)])
def test_kernel_configs_and_odd_sizes(config):
    # Channels not a multiple of the block, d_state not a power of two, sequence not a multiple of the chunk.
    cfg = triton_scan.KernelConfig(**config)
    x = {k: None if v is None else v.detach() for k, v in make_inputs(2, 11, 37, 3, True, True, True).items()}
    gout = torch.randn(2, 11, 37)
    out, last, ckpt = triton_scan.forward(*x.values(), True, config=cfg)
    got = triton_scan.backward(gout, *x.values(), True, ckpt, config=cfg)
    ref_in = {k: None if v is None else v.double().requires_grad_() for k, v in x.items()}
    ref, ref_last = naive_scan(**ref_in, delta_softplus=True, return_last_state=True)
    want = torch.autograd.grad(ref, [v for v in ref_in.values()], gout.double())
    assert rel_err(out, ref) < 1e-5 and rel_err(last, ref_last) < 1e-5
    for name, a, b in zip(NAMES[1:], got, want):
        assert rel_err(a, b) < 1e-5, name


def test_bf16_inputs_keep_an_fp32_state():
    x = make_inputs(2, 6, 49, 8, True, True, True, dtype=torch.bfloat16)
    gout = torch.randn(2, 6, 49, generator=torch.Generator().manual_seed(1)).bfloat16()
    ours = grads(lambda **a: selective_scan(**a, impl="triton"), x, gout)
    torch_scan = grads(lambda **a: selective_scan(**a, impl="torch"), x, gout)
    exact = naive_scan(**{k: v.detach().double() for k, v in x.items()}, delta_softplus=True)
    assert ours[0].dtype == torch.bfloat16 and rel_err(ours[0], exact) < 1e-2  # bf16 rounding of the output only
    for name, a, b in zip(NAMES, ours, torch_scan):  # the same fp32 arithmetic as our PyTorch scan, up to rounding
        assert a.dtype == b.dtype and rel_err(a, b) < 1e-2, name


def test_last_state():
    x = make_inputs(2, 6, 45, 8, False, True, True)
    out, last = selective_scan(**x, delta_softplus=True, return_last_state=True, impl="triton")
    ref_out, ref_last = naive_scan(**x, delta_softplus=True, return_last_state=True)
    assert last.shape == (2, 6, 8) and not last.requires_grad and rel_err(last, ref_last) < 1e-5


def test_demo_model_agrees_with_the_torch_scan():
    torch.manual_seed(0)
    # eval(): BatchNorm on running statistics, so that every parameter has a gradient that is not rounding noise
    ref = timm.create_model("mambavision_demo", scan_impl="torch").eval()
    model = timm.create_model("mambavision_demo", scan_impl="triton").eval()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 32, 32)
    losses = [m(x).logsumexp(-1).sum() for m in (ref, model)]
    for loss in losses:
        loss.backward()
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        assert rel_err(b.grad, a.grad) < 1e-4, name


def test_the_operator_reads_strided_inputs_right():
    """torch.compile calls the operator directly with whatever strides Inductor chose: transposed and sliced views
    give the same outputs and gradients as their contiguous copies."""
    x = {k: v.detach() for k, v in make_inputs(2, 6, 40, 8, True, True, True).items()}
    strided = {k: v.transpose(-1, -2).contiguous().transpose(-1, -2) if v.dim() == 3 else v for k, v in x.items()}
    strided["u"] = torch.cat([x["u"], x["u"]], dim=-1)[..., ::2]  # every other element of a wider tensor
    strided["u"].copy_(x["u"])
    assert not any(v.is_contiguous() for k, v in strided.items() if v.dim() == 3)
    args = lambda d: (d["u"], d["delta"], d["A"], d["B"], d["C"], d["D"], d["z"], d["delta_bias"], True, "triton")
    want, got = torch.ops.mambavision.selective_scan(*args(x)), torch.ops.mambavision.selective_scan(*args(strided))
    assert all(torch.equal(a, b) for a, b in zip(want[:2], got[:2]))
    gout = torch.randn(2, 6, 40).transpose(0, 1).contiguous().transpose(0, 1)  # a strided incoming gradient too
    back = lambda d, res: torch.ops.mambavision.selective_scan_backward(gout, *args(d)[:8], *res[2:], True, "triton")
    assert all(torch.equal(a, b) for a, b in zip(back(x, want), back(strided, got)))


def test_auto_choice_and_clear_errors(monkeypatch):
    monkeypatch.delenv("MAMBAVISION_SCAN", raising=False)
    assert resolve_impl(None, torch.device("cpu")) == "torch"  # auto never picks the interpreter
    assert resolve_impl(None, torch.device("cuda")) in ("cuda", "triton")  # only a device type: nothing runs
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="needs the triton package .* and CUDA tensors"):
        resolve_impl("triton", torch.device("cpu"))


def test_without_triton(tmp_path, env):
    # A triton that fails to import (absent, or built for another torch): auto never picks it, and asking for it
    # is one line naming the fix, before anything is built.
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('no triton here')\n")
    env = dict(env, PYTHONPATH=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    code = ("import torch\nfrom mambavision_train.ops.selective_scan import resolve_impl\n"
            "print(resolve_impl(None, torch.device('cuda')))\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() in ("torch", "cuda"), res.stderr
    res = subprocess.run([sys.executable, "train.py", "experiment=demo", "model.scan_impl=triton",
                          f"run_dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    # A CUDA build of torch without triton warns about it itself, once, on importing its FLOP counter.
    lines = [ln for ln in res.stderr.strip().splitlines() if "triton not found; flop counting" not in ln]
    assert len(lines) == 1 and "triton" in lines[0] and "scan_impl" in lines[0], res.stderr
    assert not (tmp_path / "run").exists()
