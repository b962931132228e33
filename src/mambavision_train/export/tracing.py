"""The traced program: what the exported file computes, the size it is traced at, torch.export itself, and the
comparison every written file must pass against the eager model.

Why tracing needs care here. The scan's loops run over window² steps, fixed per stage whatever the image size (the
map is padded to whole windows), so they unroll to the same graph at every size; only the number of sequences
(images x windows) varies. What can go wrong is the tracer taking a size-derived value for a constant: torch.export
specialises sizes of 0 and 1, and a branch on a pad amount would keep the traced size's choice. So a dynamic
height/width is traced at a size where every windowed stage is padded and spans at least two windows a side
(``trace_size``), the layer pads without branching on a symbolic size (MambaVisionLayer.forward), and every file
is run at another padding than the traced one before the command succeeds."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.export import Dim, ExportedProgram


INPUT = "images"


class CheckFailed(RuntimeError):
    """A written file that does not compute what the model computes."""


@dataclass
class Target:
    module: nn.Module  # images -> a tensor or a tuple of tensors, one per output name
    outputs: list[str]


class StageMaps(nn.Module):
    """The backbone's four stage maps (timm's forward_intermediates: each before its stage's downsample), for a
    detection or segmentation head downstream (docs/dense.md)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images):
        return tuple(self.model.forward_intermediates(images, intermediates_only=True))


def target(model: nn.Module, features: bool = False) -> Target:
    """What the exported file computes from a batch of images; the one place that chooses it: the logits, or with
    ``features`` the four stage maps."""
    if features:
        return Target(StageMaps(model).eval(), [f"stage{i + 1}" for i in range(len(model.levels))])
    return Target(model, ["logits"])


def trace_size(model, height: int, width: int) -> tuple[int, int]:
    """The smallest size from (height, width) up at which every windowed stage is padded, spans two windows or more
    a side, and the two sides of its map differ: no pad amount, window count or side that the graph computes from
    the size is a 0, a 1 or equal to another at trace time, where the tracer could take it for a constant."""
    windows = [(4 << i, level.window_size) for i, level in enumerate(model.levels) if level.transformer_block]

    def sides(px: int) -> list[int]:  # a stage's map after the stem (stride 4) and downsamplers (2 each), rounded up
        return [-(-px // stride) for stride, _ in windows]

    def generic(px: int) -> bool:  # (a window of 1 never pads: its pad is 0 at every size, and the graph knows it)
        return all(side > ws and (ws == 1 or side % ws) for side, (_, ws) in zip(sides(px), windows))

    h = next(px for px in itertools.count(height) if generic(px))
    w = next(px for px in itertools.count(width) if generic(px) and all(a != b for a, b in zip(sides(px), sides(h))))
    return h, w


def trace(tgt: Target, batch: int, size: tuple[int, int], dynamic_batch: bool, dynamic_size: bool) -> ExportedProgram:
    """torch.export of the target on a (batch, 3, *size) input. Dynamic dimensions are ``Dim.AUTO``: the guards
    torch.export records at a traced size (how views fold the window counts) are the program's, not the graph's, and
    explicit dims would refuse them; that no dimension was specialised is checked here, that the graph is right at
    other sizes by running it."""
    dims = {**({0: Dim.AUTO} if dynamic_batch else {}), **({2: Dim.AUTO, 3: Dim.AUTO} if dynamic_size else {})}
    example = torch.randn(batch, 3, *size)
    ep = torch.export.export(tgt.module, (example,), dynamic_shapes=(dims,) if dims else None)
    shape = input_shape(ep)
    fixed = [("batch", "height", "width")[(0, 2, 3).index(i)] for i in dims if not isinstance(shape[i], torch.SymInt)]
    if fixed:
        raise CheckFailed(f"torch.export fixed the {' and '.join(fixed)} of the input at {tuple(example.shape)}; "
                          "export with a static size instead")
    return ep


def input_shape(ep: ExportedProgram) -> tuple:
    """The images input's shape, symbols for the dynamic dimensions."""
    name = ep.graph_signature.user_inputs[0]
    return tuple(next(n for n in ep.graph.nodes if n.name == name).meta["val"].shape)


def dim_names(ep: ExportedProgram) -> dict[str, str]:
    """Symbol of each dynamic input dimension -> its name in the file (batch, height, width)."""
    shape = input_shape(ep)
    return {str(shape[i]): name for i, name in ((0, "batch"), (2, "height"), (3, "width"))
            if isinstance(shape[i], torch.SymInt)}


def custom_op_calls(ep: ExportedProgram) -> int:
    """How many times the graph calls the scan operator (kept as one node each)."""
    op = torch.ops.mambavision.selective_scan.default
    return sum(n.target is op for n in ep.graph.nodes)


@dataclass
class Comparison:
    shapes: list[tuple]
    max_diff: float
    argmax_equal: int | None  # images whose top class agrees (logits only)
    images: int

    def __str__(self) -> str:
        at = ", ".join("x".join(map(str, s)) for s in self.shapes)
        agree = "" if self.argmax_equal is None else f", argmax {self.argmax_equal}/{self.images} equal"
        return f"at {at}: max |diff| {self.max_diff:.1e}{agree}"


def compare(run, tgt: Target, shapes: list[tuple], tolerance: float, what: str) -> Comparison:
    """``run(images) -> outputs`` against the eager target on random images of each shape. Fails when an output
    differs by more than ``tolerance`` times its magnitude (at least 1)."""
    gen = torch.Generator().manual_seed(0)
    worst, agree, images = 0.0, 0, 0
    for shape in shapes:
        x = torch.randn(shape, generator=gen)
        with torch.no_grad():
            ref = tgt.module(x)
        ref = list(ref) if isinstance(ref, (tuple, list)) else [ref]
        got = [torch.as_tensor(g) for g in run(x)]
        for name, r, g in zip(tgt.outputs, ref, got):
            if tuple(g.shape) != tuple(r.shape):
                raise CheckFailed(f"{what}: {name} is {tuple(g.shape)} at input {shape}, PyTorch's {tuple(r.shape)}")
            diff = (g - r).abs().max().item()
            if not diff <= tolerance * max(1.0, r.abs().max().item()):  # NaN fails too
                raise CheckFailed(f"{what}: {name} differs from PyTorch by {diff:.2e} at input {shape} "
                                  f"(|{name}| up to {r.abs().max().item():.2f})")
            worst = max(worst, diff)
            if name == "logits":
                agree += int((g.argmax(1) == r.argmax(1)).sum())
        images += shape[0]
    return Comparison(shapes, worst, agree if "logits" in tgt.outputs else None, images)


def check_pt2(path, tgt: Target, shapes: list[tuple], tolerance: float) -> Comparison:
    """The saved program, loaded back as a user would (the operator comes from importing this package), against
    the eager model."""
    module = torch.export.load(str(path)).module()

    def run(x):
        out = module(x)
        return list(out) if isinstance(out, (tuple, list)) else [out]
    return compare(run, tgt, shapes, tolerance, f"{path} (torch.export.load)")
