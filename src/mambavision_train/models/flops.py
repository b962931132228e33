"""FLOPs of a model as the paper reports them, counted by torch.utils.flop_counter on the meta device.

The paper's figures are MACs from ptflops, which hooks nn.Conv*/nn.Linear modules: it sees neither the selective
scan nor the attention matmuls inside F.scaled_dot_product_attention. So ``macs`` counts the convolutions and
linear layers and reproduces the paper's column; the attention matmuls (everything an attention module computes
beyond its qkv/proj layers) and the scan are reported on their own. Normalisation and activations are not counted (they are <1% of the total).
The scan is one operator with a registered FLOP formula (ops/selective_scan/op.py), so the counter sees it directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .mambavision import Attention


@dataclass
class FlopCount:
    macs: int  # paper convention: convolutions + linear layers
    attention_macs: int  # q @ k^T and attn @ v in the attention blocks
    scan_macs: int  # the selective scan: 3 per (batch, channel, token, state) + the D skip (op.scan_macs)
    by_op: dict  # aten op name -> MACs

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def count_flops(model: nn.Module, resolution: int | tuple[int, int] = 224, batch_size: int = 1) -> FlopCount:
    """MACs of one forward pass at ``resolution`` (int or (H, W)), per batch of ``batch_size`` images."""
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    was_training = model.training
    model.eval()
    x = torch.empty(batch_size, 3, h, w, device="meta")
    # Run on meta stand-ins for the weights: counting costs neither compute nor memory, whatever the model's size.
    meta_state = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict(keep_vars=True).items()}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        torch.func.functional_call(model, meta_state, (x,))
    model.train(was_training)
    counts = counter.get_flop_counts()
    by_op = {str(op): v // 2 for op, v in counts.get("Global", {}).items()}
    scan = sum(v for op, v in by_op.items() if op.startswith("mambavision.selective_scan"))
    # Attention matmuls: what attention modules compute beyond their own Linear layers (qkv, proj).
    root = type(model).__name__
    attention = 0
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            inner = sum(counts.get(f"{root}.{name}", {}).values())
            linears = sum(sum(counts.get(f"{root}.{name}.{child}", {}).values())
                          for child, m in module.named_children() if isinstance(m, nn.Linear))
            attention += (inner - linears) // 2
    total = sum(by_op.values()) - scan
    return FlopCount(macs=total - attention, attention_macs=attention, scan_macs=scan, by_op=by_op)

