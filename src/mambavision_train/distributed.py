"""Process groups from torchrun's or SLURM's environment, their timeouts, and the collectives the run uses.

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; under ``srun`` we read SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS and
take MASTER_ADDR from the first node of the allocation. NCCL on CUDA, gloo on CPU. The environment is only read:
what Slurm implies is handed to ``init_process_group`` explicitly, not written back into ``os.environ``.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    save_group: object = None  # the process group with checkpoint.timeout_s, when there is one

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class Launch:
    """How this process was started: its place among ``world_size`` processes, and whether srun (not torchrun)
    started it, in which case the rendezvous address comes from Slurm too (``slurm_rendezvous``)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    by_slurm: bool = False


def launch_env(environ: Mapping[str, str] | None = None) -> Launch:
    """The launch described by ``environ`` (default: this process's). torchrun's variables win over Slurm's (torchrun
    inside an sbatch job); a single Slurm task is a plain single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) < 2:
        return Launch(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))
    return Launch(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")), int(env["SLURM_NTASKS"]), True)


def slurm_rendezvous(environ: Mapping[str, str] | None = None) -> str:
    """``tcp://host:port`` where rank 0 of an srun launch listens: MASTER_ADDR / MASTER_PORT if the job sets them,
    else the first node of the allocation and a port derived from the job id (the same on every rank)."""
    env = os.environ if environ is None else environ
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    else:
        addr = first_node_address(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    port = env.get("MASTER_PORT", str(job_port(int(env.get("SLURM_JOB_ID", "0")))))
    return f"tcp://{addr}:{port}"


# Rendezvous ports derived from the job id: below Linux's ephemeral range (32768-60999, where the kernel picks the
# ports of outgoing connections) and above the well-known services. Two jobs on one node get the same port only if
# their ids differ by a multiple of the range's size, so jobs fewer than ~20,000 ids apart never share one (the
# earlier 29500 + id % 1000 made jobs 1000 apart collide on shared nodes).
PORT_BASE, PORT_RANGE = 12000, 20000


def job_port(job_id: int) -> int:
    return PORT_BASE + job_id % PORT_RANGE


def first_node_address(nodelist: str) -> str:
    """The address of the allocation's first node: its NodeAddr in Slurm (a node name need not resolve)."""
    def scontrol(*args):
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True).stdout
    try:
        first = scontrol("show", "hostnames", nodelist).split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]
    try:
        return re.search(r"NodeAddr=(\S+)", scontrol("show", "node", "-o", first)).group(1)
    except (OSError, subprocess.CalledProcessError, AttributeError):
        return first


def env_world_size() -> int:
    """The number of processes this run was started as (torchrun's or srun's environment), before any init."""
    return launch_env().world_size


def pick_device(device: str, local_rank: int) -> torch.device:
    """The device of this process: ``device`` as given (cpu, cuda:N), or for auto/cuda the GPU of its local rank
    among those it can see. Sites that bind one GPU per task (``--gpus-per-task``, ``--gpu-bind``) show each process
    a single GPU, which is then ``cuda:0`` whatever the local rank."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda":
        return torch.device(device)
    visible = torch.cuda.device_count()
    if visible == 1:
        return torch.device("cuda:0")
    if local_rank >= visible:
        from .errors import ConfigError
        raise ConfigError(f"local rank {local_rank} has no GPU of its own: this process sees {visible} GPU(s) "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start one process "
                          f"per GPU (--ntasks-per-node = --gpus-per-node)")
    return torch.device(f"cuda:{local_rank}")


def init_distributed(device: str = "auto", timeout_s: float = 600.0, save_timeout_s: float | None = None) -> DistInfo:
    """The process group of this launch, its collectives bounded by ``timeout_s``; with ``save_timeout_s``, a second
    group (gloo, host memory) with that longer bound for the waits on rank 0's checkpoint writes (``save_group``)."""
    launch = launch_env()
    dev = pick_device(device, launch.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    save_group = None
    if launch.world_size > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        # torchrun: env:// (the default), which also finds its agent's store; srun: everything said explicitly.
        where = (dict(init_method=slurm_rendezvous(), rank=launch.rank, world_size=launch.world_size)
                 if launch.by_slurm else restart_safe_store(timeout) or {})
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None,
                                timeout=timeout, **where)
        if save_timeout_s is not None:
            save_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=save_timeout_s))
    return DistInfo(rank=launch.rank, local_rank=launch.local_rank, world_size=launch.world_size, device=dev,
                    save_group=save_group)


def restart_safe_store(timeout: timedelta, environ: Mapping[str, str] | None = None) -> dict | None:
    """init_process_group's store under a single-node torchrun that may restart its workers, else None (env://).

    The agent shares its rendezvous store with the workers and keeps it across restarts, and torch's env:// puts no
    attempt in the keys: a restarted group can read the addresses of the processes it replaced and fail with "Gloo
    connectFullMesh ... Connection refused" (NCCL: a stale unique id; pytorch#135712, #167288). One agent means one
    restart count for every worker, so it can be the prefix. Over several nodes the counts can differ between agents:
    there torchrun needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/training.md)."""
    env = os.environ if environ is None else environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or env.get("LOCAL_WORLD_SIZE") != env.get("WORLD_SIZE"):
        return None
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False, timeout=timeout)
    attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dict(store=dist.PrefixStore(f"mambavision/attempt_{attempt}", store), rank=rank, world_size=world)


# What a collective raises when a peer process is gone or silent: gloo's transport errors and c10d's own; NCCL's
# watchdog instead aborts the process itself after the timeout (its "Watchdog caught collective operation timeout").
PEER_LOST = re.compile(r"gloo|Connection (reset|closed|refused)|Broken pipe|Timed out waiting|timeout caused pair "
                       r"closure|NCCL communicator was aborted|NCCL error")


def is_peer_failure(e: BaseException | None) -> bool:
    for _ in range(8):  # the exception and what it was raised from
        if e is None:
            return False
        if isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and PEER_LOST.search(str(e))):
            return True
        e = e.__cause__ or e.__context__
    return False


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor, group=None) -> torch.Tensor:
    """``group``: a gloo group (DistInfo.save_group) takes tensors in host memory."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def barrier(device: torch.device, group=None):
    if dist.is_available() and dist.is_initialized():
        if group is not None:  # gloo
            dist.barrier(group=group)
        else:
            dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def gather_objects(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def reduce_bn_stats(model: torch.nn.Module):
    """Average BatchNorm running statistics over the ranks before evaluation (timm's dist_bn=reduce)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    for name, buf in model.named_buffers():
        if ("running_mean" in name or "running_var" in name) and buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= world


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class SyncBatchNormAnyDevice(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span all ranks, on any device and backend.

    torch.nn.SyncBatchNorm only runs on CUDA/XPU; this one is for gloo/CPU (and is used only there). Two passes
    (mean, then variance around it) over autograd-aware all-reduces give the statistics of the concatenated batch."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        import warnings
        with warnings.catch_warnings():  # deprecated in favour of a private API without autograd; still correct
            warnings.simplefilter("ignore", FutureWarning)
            from torch.distributed.nn.functional import all_reduce
            return self._forward_synced(x, all_reduce)

    def _forward_synced(self, x, all_reduce):
        dims = (0, 2, 3)
        count = all_reduce(x.new_tensor([x.numel() / x.shape[1]]))
        mean = all_reduce(x.sum(dims)) / count
        centered = x - mean[None, :, None, None]
        var = all_reduce((centered * centered).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * count / (count - 1), m)
        y = centered * torch.rsqrt(var + self.eps)[None, :, None, None]
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None] if self.affine else y


def convert_sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if device.type in ("cuda", "xpu"):
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            sync = SyncBatchNormAnyDevice(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            sync.to(child.weight.device if child.affine else child.running_mean.device)
            setattr(model, name, sync)
        else:
            convert_sync_batchnorm(child, device)
    return model
