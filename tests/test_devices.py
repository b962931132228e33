"""Which device, precision and rendezvous port a process takes on a GPU node, shown with the CUDA queries mocked:
one GPU per task or all of them visible, GPUs with and without native bf16, jobs that share a node."""

import pytest
import torch

from mambavision_train.errors import ConfigError
from mambavision_train.preflight import check_device
from mambavision_train.distributed import PORT_BASE, PORT_RANGE, job_port, pick_device
from mambavision_train.precision import amp_dtype


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)``: this process sees n CUDA devices (nothing is initialised)."""
    def visible(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return visible


def test_each_rank_takes_the_gpu_it_can_see(gpus):
    gpus(8)  # the whole node visible to every task: local rank r takes GPU r
    assert pick_device("auto", 3) == pick_device("cuda", 3) == torch.device("cuda:3")
    gpus(1)  # --gpus-per-task=1 / --gpu-bind: every task sees its own GPU as cuda:0
    assert [pick_device("auto", r) for r in range(8)] == [torch.device("cuda:0")] * 8
    gpus(2)  # fewer GPUs than tasks: one line, not an invalid ordinal deep in NCCL
    with pytest.raises(ConfigError, match="local rank 3 has no GPU of its own: this process sees 2 GPU"):
        pick_device("cuda", 3)
    assert pick_device("cuda:1", 0) == torch.device("cuda:1") and pick_device("cpu", 5) == torch.device("cpu")
    gpus(0)
    assert pick_device("auto", 2) == torch.device("cpu")


def test_one_fixed_gpu_for_several_processes_is_refused(gpus):
    gpus(8)
    check_device("cuda:3")  # one process: any GPU it sees
    check_device("cuda", world_size=8)
    with pytest.raises(ConfigError, match="device=cuda:0 with 8 processes would put every rank on one GPU"):
        check_device("cuda:0", world_size=8)


@pytest.mark.parametrize("native, want", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_auto_takes_bf16_only_where_the_gpu_has_it(monkeypatch, native, want):
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native or including_emulation  # a V100 "supports" bf16 by emulation, several times slower
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert amp_dtype("auto", torch.device("cuda:0")) == want and asked == [False]
    assert amp_dtype("auto", torch.device("cpu")) is None
    assert amp_dtype("bf16", torch.device("cuda:0")) == torch.bfloat16 and amp_dtype("fp32", torch.device("cpu")) is None


def test_jobs_sharing_a_node_get_different_rendezvous_ports():
    ports = {job_port(j) for j in range(4_000_000, 4_000_000 + PORT_RANGE)}
    assert len(ports) == PORT_RANGE  # jobs up to PORT_RANGE - 1 ids apart never share a port (1000 apart did)
    assert job_port(1234) != job_port(2234) != job_port(3234)
    assert PORT_BASE >= 1024 and PORT_BASE + PORT_RANGE <= 32768  # below the kernel's ephemeral ports


def test_a_torch_below_the_floor_is_one_line_before_anything_else(env, monkeypatch):
    import tomllib

    from mambavision_train import preflight
    from helpers.runs import ROOT, run_in_process
    from torch.torch_version import TorchVersion
    floor = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
             if d.startswith("torch>")]
    assert floor == [f"torch>={preflight.TORCH_FLOOR}"]  # the install and the check say the same
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.7.1+cu126"))
    res = run_in_process("train.py", "experiment=demo", env=env)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [res.stderr.strip()], res.stderr
    assert res.stderr.startswith("error: torch 2.7.1+cu126 is too old: mambavision-train needs torch >= 2.8")
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.8.0"))
    assert preflight.torch_problem() is None
