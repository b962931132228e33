"""The selective scan: our PyTorch implementation against a naive per-step loop and mamba_ssm's reference."""

import os
import subprocess
import sys

import pytest
import torch

from mambavision_train.ops.selective_scan import ENV_VAR, available_impls, resolve_impl, selective_scan
from mambavision_train.ops.selective_scan.torch_scan import linear_scan, linear_scan_reverse, _chunking
from helpers.scan_reference import grads, make_inputs, naive_scan, rel_err

VARIANTS = [(True, True, True), (False, False, False), (False, True, True), (True, False, False)]
SHAPES = [(2, 6, 1, 4), (2, 6, 13, 4), (2, 8, 49, 8), (1, 4, 196, 8), (2, 3, 50, 2)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_z,with_D,with_bias", VARIANTS)
def test_matches_naive_loop(shape, with_z, with_D, with_bias):
    x = make_inputs(*shape, with_z, with_D, with_bias)
    out = selective_scan(**x, delta_softplus=True, impl="torch")
    assert out.dtype == torch.float32 and out.shape == x["u"].shape
    assert rel_err(out, naive_scan(**x, delta_softplus=True)) < 1e-5


@pytest.mark.reference
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_z,with_D,with_bias", VARIANTS)
def test_matches_mamba_ssm_reference_forward_and_grads(official, shape, with_z, with_D, with_bias):
    from mambavision_train.ops.selective_scan.mamba_ssm_compat import reference_selective_scan_fn

    x = make_inputs(*shape, with_z, with_D, with_bias)
    gout = torch.randn(shape[0], shape[1], shape[2], generator=torch.Generator().manual_seed(1))
    ours = grads(lambda **kw: selective_scan(**kw, impl="torch"), x, gout)
    ref = grads(reference_selective_scan_fn(), x, gout)
    names = ["out"] + [k for k, v in x.items() if v is not None]
    for name, a, b in zip(names, ours, ref):
        assert rel_err(a, b) < 1e-5, name


def test_gradients_match_naive_loop_without_softplus():
    x = make_inputs(2, 5, 17, 3, True, True, True)
    gout = torch.randn(2, 5, 17)
    ours = selective_scan(**x, impl="torch")
    ref = naive_scan(**x)
    leaves = [v for v in x.values() if v is not None]
    for a, b in zip(torch.autograd.grad(ours, leaves, gout), torch.autograd.grad(ref, leaves, gout.double())):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("with_z,with_D,with_bias", VARIANTS)
def test_gradcheck_float64(with_z, with_D, with_bias):
    x = make_inputs(2, 3, 11, 2, with_z, with_D, with_bias, dtype=torch.float64)
    keys = [k for k, v in x.items() if v is not None]
    fn = lambda *vals: selective_scan(**dict(zip(keys, vals)), delta_softplus=True, impl="torch")
    assert torch.autograd.gradcheck(fn, tuple(x[k] for k in keys), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_keep_an_fp32_state(dtype):
    x = make_inputs(2, 8, 49, 8, True, True, True, dtype=dtype)
    out = selective_scan(**x, delta_softplus=True, impl="torch")
    assert out.dtype == dtype
    # The same low-precision inputs through the exact float64 loop: only the output rounding differs.
    exact = naive_scan(**{k: (v.detach().double() if v is not None else None) for k, v in x.items()},
                       delta_softplus=True)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert rel_err(out, exact) < tol
    out.float().sum().backward()
    assert x["u"].grad.dtype == dtype and torch.isfinite(x["u"].grad.float()).all()
    assert x["A"].grad.dtype == dtype


def test_long_sequences_do_not_overflow():
    # Large delta * |A| makes exp() underflow to 0 inside a chunk: the chunk products must stay exact.
    x = make_inputs(1, 4, 300, 4, False, True, True)
    with torch.no_grad():
        x["delta"].mul_(20)
    out = selective_scan(**x, delta_softplus=True, impl="torch")
    assert torch.isfinite(out).all()
    assert rel_err(out, naive_scan(**x, delta_softplus=True)) < 1e-5


def test_return_last_state():
    x = make_inputs(2, 6, 23, 4, True, True, True)
    out, last = selective_scan(**x, delta_softplus=True, return_last_state=True, impl="torch")
    ref_out, ref_last = naive_scan(**x, delta_softplus=True, return_last_state=True)
    assert last.shape == (2, 6, 4) and not last.requires_grad
    assert rel_err(out, ref_out) < 1e-5 and rel_err(last, ref_last) < 1e-5
    out.sum().backward()  # the last state is not differentiable, the output still is
    assert x["u"].grad is not None


@pytest.mark.parametrize("seqlen", [1, 2, 3, 7, 49, 50, 196, 197])
def test_two_level_scan_and_its_adjoint(seqlen):
    k, nc = _chunking(seqlen)
    assert k * nc >= seqlen and k * (nc - 1) < seqlen
    a, x = torch.rand(seqlen, 3, dtype=torch.float64), torch.randn(seqlen, 3, dtype=torch.float64)
    h, fwd = torch.zeros(3, dtype=torch.float64), []
    for t in range(seqlen):
        h = a[t] * h + x[t]
        fwd.append(h)
    s, bwd = torch.zeros(3, dtype=torch.float64), [None] * seqlen
    for t in reversed(range(seqlen)):
        s = x[t] + (a[t + 1] * s if t + 1 < seqlen else 0)
        bwd[t] = s

    def layout(v, fill):
        v = torch.cat([v, torch.full((k * nc - seqlen, 3), fill, dtype=v.dtype)])
        return v.view(nc, k, 3).transpose(0, 1).contiguous()

    back = lambda v: v.transpose(0, 1).reshape(-1, 3)[:seqlen]
    assert torch.allclose(back(linear_scan(layout(a, 1.0), layout(x, 0.0))), torch.stack(fwd))
    assert torch.allclose(back(linear_scan_reverse(layout(a, 1.0), layout(x, 0.0))), torch.stack(bwd))


def test_dispatch_and_switches(monkeypatch):
    assert resolve_impl(None, torch.device("cpu")) == "torch"
    assert "torch" in available_impls()
    monkeypatch.setenv(ENV_VAR, "mamba_ref")
    assert resolve_impl(None, torch.device("cpu")) == "mamba_ref"
    assert resolve_impl("torch", torch.device("cpu")) == "torch"  # the model's own choice wins over the env
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown selective-scan implementation 'bogus'"):
        resolve_impl(None, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        resolve_impl("cuda", torch.device("cpu"))


def test_deterministic_runs_never_take_the_kernel_that_adds_with_atomics(monkeypatch):
    import importlib
    scan = importlib.import_module("mambavision_train.ops.selective_scan")  # the package; its name is a function's too
    monkeypatch.setattr(scan, "has_cuda_kernel", lambda: True)  # as on a GPU node with mamba-ssm's wheels
    monkeypatch.delenv(ENV_VAR, raising=False)
    cuda = torch.device("cuda")
    assert resolve_impl(None, cuda) == "cuda"
    assert resolve_impl(None, cuda, deterministic=True) in ("triton", "torch")
    with pytest.raises(RuntimeError, match="sums gradients with atomics, so it is not deterministic"):
        resolve_impl("cuda", cuda, deterministic=True)


def test_package_imports_with_broken_mamba_ssm(tmp_path):
    # A mamba_ssm / causal_conv1d that raise on import (as they do without their CUDA extension) must not matter.
    for name in ("mamba_ssm", "causal_conv1d", "selective_scan_cuda"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('broken on purpose')\n")
    code = ("import torch, timm, mambavision_train as m\n"
            "from mambavision_train.ops.selective_scan import available_impls\n"
            "model = timm.create_model('mambavision_demo').eval()\n"
            "print(model(torch.randn(1, 3, 32, 32)).shape, available_impls())\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torch.Size([1, 10]) ['torch']" in res.stdout


def test_the_cuda_kernel_is_found_by_its_extension_alone(tmp_path):
    # mamba_ssm 2.3's package imports far more than the scan (Mamba2/3, tilelang, cutlass-dsl): an import error
    # there must not hide the compiled scan extension, which is all we call.
    (tmp_path / "mamba_ssm").mkdir()
    (tmp_path / "mamba_ssm" / "__init__.py").write_text("raise ImportError('tilelang: broken on purpose')\n")
    (tmp_path / "selective_scan_cuda.py").write_text("def fwd(*a): pass\ndef bwd(*a): pass\n")
    code = ("from mambavision_train.ops.selective_scan.mamba_ssm_compat import has_cuda_kernel\n"
            "print(has_cuda_kernel())\n")
    res = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(tmp_path)),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.split() == ["True"], res.stderr


def test_the_scan_is_one_operator_with_a_flop_formula():
    from torch.utils.flop_counter import FlopCounterMode
    from mambavision_train.ops.selective_scan import scan_macs

    x = make_inputs(2, 6, 13, 4, False, True, True)
    with FlopCounterMode(display=False) as counter:
        out = selective_scan(**x, delta_softplus=True, impl="torch")
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts == {"mambavision.selective_scan": 2 * scan_macs(2, 6, 13, 4)}
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    assert counter.get_flop_counts()["Global"][torch.ops.mambavision.selective_scan_backward] \
        == 4 * scan_macs(2, 6, 13, 4)
    # Meta tensors go through the operator's fake implementation: shapes without computing anything.
    meta = {k: None if v is None else v.detach().to("meta") for k, v in x.items()}
    assert selective_scan(**meta, delta_softplus=True).shape == (2, 6, 13)


def test_torch_compile_traces_the_model_in_one_graph():
    """No graph break anywhere in MambaVision (torch._dynamo.explain); through AOTAutograd, which uses the operator's
    fake implementation and autograd formula, logits and gradients equal eager mode."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("mambavision_demo").eval()
    x = torch.randn(2, 3, 32, 32)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    eager_out, compiled_out = model(x), compiled(x)
    assert torch.allclose(eager_out, compiled_out, atol=1e-6, rtol=1e-5)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    compiled_grads = torch.autograd.grad(compiled_out.square().sum(), list(model.parameters()))
    for a, b in zip(eager_grads, compiled_grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
