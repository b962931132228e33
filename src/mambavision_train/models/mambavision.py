"""MambaVision: A Hybrid Mamba-Transformer Vision Backbone (Hatamizadeh & Kautz, arXiv 2407.08083).

Read top to bottom like the paper: stem -> conv stages (1, 2) -> hybrid Mamba/attention stages (3, 4) -> head.
The module tree, parameter names, initialisation and even the order of random draws follow the official code
(NVlabs/MambaVision), so official checkpoints load strictly and a seeded model is the official seeded model.
Unlike the official code, the selective scan runs without compiled kernels (``mambavision_train.ops``).
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from ..errors import CheckpointError
from ..ops.selective_scan import selective_scan
from .pretrained import load_pretrained

__all__ = ["MambaVision", "MambaVisionMixer"]


# --------------------------------------------------------------------------------------------- building blocks
class PatchEmbed(nn.Module):
    """Stem: two stride-2 3x3 convs with BN + ReLU (H/4 x W/4)."""

    def __init__(self, in_chans: int = 3, in_dim: int = 64, dim: int = 96):
        super().__init__()
        self.proj = nn.Identity()
        self.conv_down = nn.Sequential(
            nn.Conv2d(in_chans, in_dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(in_dim, eps=1e-4),
            nn.ReLU(),
            nn.Conv2d(in_dim, dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(dim, eps=1e-4),
            nn.ReLU(),
        )

    def forward(self, x):
        return self.conv_down(self.proj(x))


class Downsample(nn.Module):
    """Between stages: a stride-2 3x3 conv that doubles the channels, without normalisation."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False))

    def forward(self, x):
        return self.reduction(x)


class ConvBlock(nn.Module):
    """Stages 1-2: residual conv3x3 -> BN -> GELU(tanh) -> conv3x3 -> BN."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: float | None = None, kernel_size: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=kernel_size, stride=1, padding=1)
        self.norm1 = nn.BatchNorm2d(dim, eps=1e-5)
        self.act1 = nn.GELU(approximate="tanh")
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=kernel_size, stride=1, padding=1)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-5)
        self.layer_scale = isinstance(layer_scale, (int, float)) and not isinstance(layer_scale, bool)
        if self.layer_scale:
            self.gamma = nn.Parameter(layer_scale * torch.ones(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        if self.layer_scale:
            x = x * self.gamma.view(1, -1, 1, 1)
        return shortcut + self.drop_path(x)


# ----------------------------------------------------------------------------------------------- token mixers
class MambaVisionMixer(nn.Module):
    """The MambaVision mixer (paper Fig. 3): a non-causal selective-scan branch and a conv branch without SSM.

    The input is projected and split into x and z (C/2 each). Both go through a depthwise 'same' conv1d and SiLU; x
    then drives the selective scan, and the two halves are concatenated (no multiplicative gate) and projected back.
    """

    def __init__(self, d_model: int, d_state: int = 8, d_conv: int = 3, expand: int = 1, dt_rank="auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, scan_impl: str | None = None):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.scan_impl = scan_impl
        half = self.d_inner // 2
        self.in_proj = nn.Linear(d_model, self.d_inner, bias=False)
        self.x_proj = nn.Linear(half, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, half, bias=True)
        # Mamba's dt initialisation. QUIRK 2 (official code): MambaVision._init_weights later re-initialises every
        # Linear, so dt_proj ends at trunc_normal(0.02) weights and a zero bias; this init only advances the RNG.
        # We keep it so that a seeded model draws exactly the official random numbers.
        dt_init_std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(torch.rand(half) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(half, 1))
        self.D = nn.Parameter(torch.ones(half))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.conv1d_x = nn.Conv1d(half, half, kernel_size=d_conv, groups=half, bias=False)
        self.conv1d_z = nn.Conv1d(half, half, kernel_size=d_conv, groups=half, bias=False)

    def forward(self, hidden_states):  # (B, L, C) -> (B, L, C)
        half = self.d_inner // 2
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, C, L)
        # Both depthwise convs as one grouped conv over the concatenated channels: the same arithmetic, one kernel.
        conv_w = torch.cat([self.conv1d_x.weight, self.conv1d_z.weight], dim=0)
        x, z = F.silu(F.conv1d(xz, conv_w, padding="same", groups=self.d_inner)).split(half, dim=1)
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2n)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt).transpose(1, 2)  # (B, C/2, L)
        B = B.transpose(1, 2).contiguous()  # (B, n, L)
        C = C.transpose(1, 2).contiguous()
        A = -torch.exp(self.A_log.float())
        # QUIRK 1 (official code): dt_proj already added its bias, and the scan adds it again as delta_bias,
        # so delta = softplus(W dt + 2 b). Kept: official checkpoints were trained with it.
        y = selective_scan(x.contiguous(), dt.contiguous(), A, B, C, self.D.float(), z=None,
                           delta_bias=self.dt_proj.bias.float(), delta_softplus=True, impl=self.scan_impl)
        y = torch.cat([y.to(z.dtype), z], dim=1)  # no gating: the conv branch is concatenated
        return self.out_proj(y.transpose(1, 2))


class Attention(nn.Module):
    """Multi-head self-attention within a window (no position embedding)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} must be divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    """Pre-norm residual block of stages 3-4 with a Mamba mixer or self-attention, then an MLP."""

    def __init__(self, dim: int, num_heads: int, use_attention: bool, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, layer_scale: float | None = None,
                 scan_impl: str | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if use_attention:
            self.mixer = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        else:
            self.mixer = MambaVisionMixer(d_model=dim, d_state=8, d_conv=3, expand=1, scan_impl=scan_impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        use_ls = isinstance(layer_scale, (int, float)) and not isinstance(layer_scale, bool)
        self.gamma_1 = nn.Parameter(layer_scale * torch.ones(dim)) if use_ls else 1
        self.gamma_2 = nn.Parameter(layer_scale * torch.ones(dim)) if use_ls else 1

    def forward(self, x):
        x = x + self.drop_path(self.gamma_1 * self.mixer(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


# ------------------------------------------------------------------------------------------------------ stages
def window_partition(x, ws: int):
    """(B, C, H, W) -> (B * num_windows, ws * ws, C), windows in raster order."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // ws, ws, W // ws, ws)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, ws * ws, C)


def window_reverse(windows, ws: int, H: int, W: int):
    """Inverse of window_partition: (B * num_windows, ws * ws, C) -> (B, C, H, W)."""
    C = windows.shape[2]
    x = windows.reshape(-1, H // ws, W // ws, ws, ws, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, C, H, W)


def attention_block_indices(depth: int) -> list[int]:
    """The second half of a stage uses self-attention (the middle block stays Mamba when depth is odd)."""
    return list(range(depth // 2 + 1, depth)) if depth % 2 else list(range(depth // 2, depth))


@contextlib.contextmanager
def running_stats_kept(module: nn.Module):
    """The BatchNorms in ``module`` run as in training (the same ops, so checkpoint finds the tensors it saved the
    first time), with momentum 0 and their batch count put back: the running statistics stay as they are."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def checkpointed(block: nn.Module, x):
    """``block(x)`` with its activations recomputed in the backward instead of kept. The recomputation runs the
    block's forward a second time: left alone, the stage 1-2 BatchNorms would take every batch into their running
    statistics twice, a different model from the one trained without checkpointing. DropPath draws the same masks
    again (checkpoint replays the RNG state)."""
    # Dynamo takes no context_fn, and needs none: compiled, the recomputation does not repeat BatchNorm's in-place
    # update (the running statistics equal the plain step's; checked on the demo model, CPU and CUDA).
    if torch.compiler.is_compiling():
        return checkpoint(block, x, use_reentrant=False)
    return checkpoint(block, x, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), running_stats_kept(block)))


class MambaVisionLayer(nn.Module):
    """One stage: conv blocks (stages 1-2) or windowed hybrid blocks (stages 3-4), then an optional downsample.
    ``downsample=False`` returns the stage's own map, before the downsample: what dense heads take."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, conv: bool = False,
                 downsample: bool = True, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path=0.0, layer_scale=None, layer_scale_conv=None,
                 scan_impl: str | None = None):
        super().__init__()
        dpr = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.transformer_block = not conv
        if conv:
            self.blocks = nn.ModuleList([ConvBlock(dim, drop_path=dpr[i], layer_scale=layer_scale_conv) for i in range(depth)])
        else:
            attn = set(attention_block_indices(depth))
            self.blocks = nn.ModuleList([
                Block(dim, num_heads, use_attention=i in attn, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop,
                      attn_drop=attn_drop, drop_path=dpr[i], layer_scale=layer_scale, scan_impl=scan_impl)
                for i in range(depth)])
        self.downsample = Downsample(dim) if downsample else None
        self.window_size = window_size
        self.grad_checkpointing = False

    def forward(self, x, downsample: bool = True):
        H, W = x.shape[2:]
        if self.transformer_block:
            # Zero-pad right/bottom to a multiple of the window, as the official code does (no attention mask).
            ws = self.window_size
            pad_r, pad_b = (W + ws - 1) // ws * ws - W, (H + ws - 1) // ws * ws - H
            # A symbolic size (torch.export with a dynamic height/width) always pads and crops, by amounts the graph
            # computes: a branch on them would freeze the traced size's choice into the graph. A known size skips
            # the copy when there is nothing to pad.
            padded = not (isinstance(H, int) and isinstance(W, int)) or pad_r > 0 or pad_b > 0
            if padded:
                x = F.pad(x, (0, pad_r, 0, pad_b))
            Hp, Wp = x.shape[2:]
            x = window_partition(x, ws)
        for blk in self.blocks:
            x = checkpointed(blk, x) if self.grad_checkpointing and self.training else blk(x)
        if self.transformer_block:
            x = window_reverse(x, ws, Hp, Wp)
            if padded:
                x = x[:, :, :H, :W].contiguous()
        return x if self.downsample is None or not downsample else self.downsample(x)


# ------------------------------------------------------------------------------------------------------- model
class MambaVision(nn.Module):
    def __init__(self, dim: int, in_dim: int, depths, window_size, mlp_ratio: float, num_heads,
                 drop_path_rate: float = 0.2, in_chans: int = 3, num_classes: int = 1000, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, layer_scale=None, layer_scale_conv=None,
                 scan_impl: str | None = None, **kwargs):
        super().__init__()
        kwargs.pop("resolution", None)  # accepted (and ignored) like the official constructor
        if kwargs:
            raise TypeError(f"MambaVision got unexpected arguments: {sorted(kwargs)}")
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = int(dim * 2 ** (len(depths) - 1))
        self.patch_embed = PatchEmbed(in_chans=in_chans, in_dim=in_dim, dim=dim)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        self.levels = nn.ModuleList()
        for i, depth in enumerate(depths):
            self.levels.append(MambaVisionLayer(
                dim=int(dim * 2 ** i), depth=depth, num_heads=num_heads[i], window_size=window_size[i],
                conv=i < 2, downsample=i < len(depths) - 1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                layer_scale=layer_scale, layer_scale_conv=layer_scale_conv, scan_impl=scan_impl))
        # Stage i's map before its downsample: dim * 2^i channels at stride 4 * 2^i (forward_intermediates).
        self.feature_info = [dict(num_chs=int(dim * 2 ** i), reduction=4 * 2 ** i, module=f"levels.{i}")
                             for i in range(len(depths))]
        self.norm = nn.BatchNorm2d(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # timm's model API
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups in forward order, for layer-wise lr decay (timm's param_groups_layer_decay): the stem,
        then every block of every level, each level's downsampler after its blocks, the final norm last."""
        return dict(stem=r"^patch_embed", blocks=r"^levels\.(\d+)" if coarse else [
            (r"^levels\.(\d+)\.blocks\.(\d+)", None),
            (r"^levels\.(\d+)\.downsample", (99998,)),
            (r"^norm", (99999,))])

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()  # the official rule (no decay for biases and ndim <= 1, A_log decayed) is timm's default

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for level in self.levels:
            level.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes: int, global_pool=None):
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):  # (B, 3, H, W) -> (B, 8*dim, H/32, W/32)
        x = self.patch_embed(x)
        for level in self.levels:
            x = level(x)
        return self.norm(x)

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature API: the maps of the stages in ``indices`` (None: all; n: the last n), each taken before
        its stage's downsample, so stage i gives dim * 2^i channels at stride 4 * 2^i (a hook on ``levels.i`` would
        see the downsampled map instead: 2 * dim * 2^i channels at twice the stride). Returns (final features,
        maps), the final features equal to forward_features(x), or the maps alone with ``intermediates_only``.
        ``norm`` applies the final BatchNorm to the last stage's map, the only one it is sized for."""
        assert output_fmt == "NCHW", "MambaVision's stage maps are NCHW"
        take, max_index = feature_take_indices(len(self.levels), indices)
        levels = self.levels[:max_index + 1] if stop_early or intermediates_only else self.levels
        last = len(self.levels) - 1
        intermediates = []
        x = self.patch_embed(x)
        for i, level in enumerate(levels):
            x = level(x, downsample=False)
            if i in take:
                intermediates.append(self.norm(x) if norm and i == last else x)
            if i < len(levels) - 1:  # the deepest stage run keeps its map: its downsample would feed no one
                x = level.downsample(x)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if len(levels) == len(self.levels) else x), intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        """Keep what forward_intermediates(indices) needs: the stages after the deepest one taken go, and so does
        that stage's downsample (it fed only them); the final norm and the head go when they no longer fit."""
        take, max_index = feature_take_indices(len(self.levels), indices)
        prune_end = max_index < len(self.levels) - 1
        self.levels = self.levels[:max_index + 1]
        self.levels[-1].downsample = None
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0)
        return take

    def forward_head(self, x, pre_logits: bool = False):
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------------------------ default cfgs
def _cfg(hf_hub_id: str = "", hf_hub_filename: str = "", **kwargs):
    return {
        "hf_hub_id": hf_hub_id, "hf_hub_filename": hf_hub_filename, "num_classes": 1000,
        "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 1.0, "crop_mode": "center",
        "interpolation": "bicubic", "fixed_input_size": False, "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225), "first_conv": "patch_embed.conv_down.0", "classifier": "head",
        "license": "nvidia-source-code-license-nc", "paper_ids": "arXiv:2407.08083", **kwargs,
    }


def _hf(size: str, filename: str, **kwargs):
    return _cfg(hf_hub_id=f"nvidia/MambaVision-{size}", hf_hub_filename=filename, **kwargs)


default_cfgs = generate_default_cfgs({
    "mambavision_t.in1k": _hf("T-1K", "mambavision_tiny_1k.pth.tar"),
    "mambavision_t2.in1k": _hf("T2-1K", "mambavision_tiny2_1k.pth.tar", crop_pct=0.98),
    "mambavision_s.in1k": _hf("S-1K", "mambavision_small_1k.pth.tar", crop_pct=0.93),
    "mambavision_b.in1k": _hf("B-1K", "mambavision_base_1k.pth.tar"),
    "mambavision_b.in21k_ft_in1k": _hf("B-21K", "mambavision_base_21k.pth.tar"),
    "mambavision_l.in1k": _hf("L-1K", "mambavision_large_1k.pth.tar"),
    "mambavision_l.in21k_ft_in1k": _hf("L-21K", "mambavision_large_21k.pth.tar"),
    "mambavision_l2.in1k": _hf("L2-1K", "mambavision_large2_1k.pth.tar"),
    "mambavision_l2_512.in21k_ft_in1k": _hf("L2-512-21K", "mambavision_L2_21k_240m_512.pth.tar",
                                            input_size=(3, 512, 512), pool_size=(16, 16), crop_pct=0.93, crop_mode="squash"),
    "mambavision_l3_256.in21k_ft_in1k": _hf("L3-256-21K", "mambavision_L3_21k_740m_256.pth.tar",
                                            input_size=(3, 256, 256), pool_size=(8, 8)),
    "mambavision_l3_512.in21k_ft_in1k": _hf("L3-512-21K", "mambavision_L3_21k_740m_512.pth.tar",
                                            input_size=(3, 512, 512), pool_size=(16, 16), crop_pct=0.93, crop_mode="squash"),
    # A small member of the family for CPU demos and tests (no weights): 64 px, windows fit 32-64 px inputs.
    "mambavision_demo.untrained": _cfg(num_classes=10, input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0,
                                       license="apache-2.0"),
})


def _create_mambavision(variant: str, pretrained: bool = False, **kwargs):
    # Not timm's pretrained path: it adapts a head of another size silently, and under features_only it drops the
    # classifier's keys and loads the rest loosely. Ours loads strictly, into the whole model, as it is built:
    # before features_only wraps it and prunes what the requested stages do not need.
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"))

    if pretrained and not (cfg.file or cfg.hf_hub_id):
        raise CheckpointError(f"{variant} has no released weights: give a file with "
                              "pretrained_cfg_overlay=dict(file=...), or load one with load_pretrained")

    def build(**model_kwargs) -> MambaVision:
        model = MambaVision(**model_kwargs)
        if pretrained:
            source = cfg.file or cfg.hf_hub_id
            other = model.num_classes != cfg.num_classes  # timm's idiom: pretrained=True, num_classes=N
            load_pretrained(model, source, filename=None if cfg.file else cfg.hf_hub_filename, new_classifier=other)
            if other:
                logging.getLogger(__name__).warning(
                    f"{variant}: loaded {source} except its classifier ({cfg.num_classes} classes), which is new "
                    f"for {model.num_classes} classes")
        return model
    # The stages end in their downsample, so timm's default feature wrapper (hooks on children) would tap the
    # downsampled maps: the getter wrapper calls forward_intermediates instead.
    return build_model_with_cfg(build, variant, pretrained=False,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **kwargs)


# --------------------------------------------------------------------------------------------------- variants
# The official model table. All: mlp_ratio 4, qkv_bias, no conv layer scale; stage dims dim * (1, 2, 4, 8).
_HEADS_S, _HEADS_L, _WIN_224 = [2, 4, 8, 16], [4, 8, 16, 32], [8, 8, 14, 7]
ARCHS = {
    "mambavision_t": dict(depths=[1, 3, 8, 4], num_heads=_HEADS_S, window_size=_WIN_224, dim=80, in_dim=32, drop_path_rate=0.2),
    "mambavision_t2": dict(depths=[1, 3, 11, 4], num_heads=_HEADS_S, window_size=_WIN_224, dim=80, in_dim=32, drop_path_rate=0.2),
    "mambavision_s": dict(depths=[3, 3, 7, 5], num_heads=_HEADS_S, window_size=_WIN_224, dim=96, in_dim=64, drop_path_rate=0.2),
    "mambavision_b": dict(depths=[3, 3, 10, 5], num_heads=_HEADS_S, window_size=_WIN_224, dim=128, in_dim=64, drop_path_rate=0.3, layer_scale=1e-5),
    "mambavision_l": dict(depths=[3, 3, 10, 5], num_heads=_HEADS_L, window_size=_WIN_224, dim=196, in_dim=64, drop_path_rate=0.3, layer_scale=1e-5),
    "mambavision_l2": dict(depths=[3, 3, 12, 5], num_heads=_HEADS_L, window_size=_WIN_224, dim=196, in_dim=64, drop_path_rate=0.3, layer_scale=1e-5),
    "mambavision_l2_512": dict(depths=[3, 3, 12, 5], num_heads=_HEADS_L, window_size=[8, 8, 32, 16], dim=196, in_dim=64, drop_path_rate=0.3, layer_scale=1e-5),
    "mambavision_l3_256": dict(depths=[3, 3, 20, 10], num_heads=_HEADS_L, window_size=[8, 8, 16, 8], dim=256, in_dim=64, drop_path_rate=0.5, layer_scale=1e-5),
    "mambavision_l3_512": dict(depths=[3, 3, 20, 10], num_heads=_HEADS_L, window_size=[8, 8, 32, 16], dim=256, in_dim=64, drop_path_rate=0.5, layer_scale=1e-5),
    # ~2.3 M parameters, every block type (conv, Mamba, attention); trains on a CPU in minutes at 32-64 px.
    "mambavision_demo": dict(depths=[1, 1, 2, 2], num_heads=[1, 2, 4, 8], window_size=[8, 8, 4, 2], dim=32, in_dim=16, drop_path_rate=0.05, num_classes=10),
}


def windows_at(img_size: int, window_size) -> list[int]:
    """Stage-3 and stage-4 windows that cover the whole feature map at ``img_size``: the rule behind the official
    variants (224 px: 14, 7; L3-256: 16, 8; L2-512 and L3-512: 32, 16). Stages 1-2 are convolutional."""
    sides, side = [], img_size
    for _ in range(5):  # the stem's two stride-2 convolutions, then the downsamplers before stages 2, 3 and 4
        side = -(-side // 2)
        sides.append(side)
    return [*window_size[:2], sides[3], sides[4]]


def eval_view_at(name: str, img_size: int) -> dict:
    """The eval transform of ``name`` at ``img_size``: that of the official variant of the same architecture at that
    resolution when there is one (L2 at 512 px: L2-512's 0.93 squash), else the variant's own crop."""
    base = {k: v for k, v in ARCHS[name].items() if k != "window_size"}
    for other, arch in ARCHS.items():
        cfg = default_cfgs[other].default
        if {k: v for k, v in arch.items() if k != "window_size"} == base and cfg.input_size[-1] == img_size:
            return dict(input_size=(3, img_size, img_size), crop_pct=cfg.crop_pct, crop_mode=cfg.crop_mode)
    return dict(input_size=(3, img_size, img_size))


def _create(name: str, pretrained: bool, kwargs: dict) -> MambaVision:
    arch = {"mlp_ratio": 4, **ARCHS[name]}
    img_size = kwargs.pop("img_size", None)
    if img_size:  # resolution is an architecture setting only through the windows (no position embeddings)
        arch["window_size"] = windows_at(img_size, arch["window_size"])
        kwargs["pretrained_cfg_overlay"] = {**eval_view_at(name, img_size), **(kwargs.get("pretrained_cfg_overlay") or {})}
    return _create_mambavision(name, pretrained=pretrained, **{**arch, **kwargs})


@register_model
def mambavision_t(pretrained=False, **kwargs) -> MambaVision:
    return _create("mambavision_t", pretrained, kwargs)


@register_model
def mambavision_t2(pretrained=False, **kwargs) -> MambaVision:
    return _create("mambavision_t2", pretrained, kwargs)


@register_model
def mambavision_s(pretrained=False, **kwargs) -> MambaVision:
    return _create("mambavision_s", pretrained, kwargs)


@register_model
def mambavision_b(pretrained=False, **kwargs) -> MambaVision:
    return _create("mambavision_b", pretrained, kwargs)


@register_model
def mambavision_l(pretrained=False, **kwargs) -> MambaVision:
    return _create("mambavision_l", pretrained, kwargs)


@register_model
def mambavision_l2(pretrained=False, **kwargs) -> MambaVision:
    return _create("mambavision_l2", pretrained, kwargs)


@register_model
def mambavision_l2_512(pretrained=False, **kwargs) -> MambaVision:
    return _create("mambavision_l2_512", pretrained, kwargs)


@register_model
def mambavision_l3_256(pretrained=False, **kwargs) -> MambaVision:
    return _create("mambavision_l3_256", pretrained, kwargs)


@register_model
def mambavision_l3_512(pretrained=False, **kwargs) -> MambaVision:
    return _create("mambavision_l3_512", pretrained, kwargs)


@register_model
def mambavision_demo(pretrained=False, **kwargs) -> MambaVision:
    return _create("mambavision_demo", pretrained, kwargs)
