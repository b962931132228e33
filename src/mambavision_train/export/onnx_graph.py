"""The ONNX file: the traced program with the scan operator decomposed into standard ops, written by torch's
exporter (dynamo, onnxscript), then checked: onnx.checker's full check, standard-domain ops only, and
onnxruntime's CPU outputs against PyTorch's.

onnx, onnxscript and onnxruntime are the ``export`` extra: imported here only, so the package trains without them."""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.export import ExportedProgram

from ..ops.selective_scan.op import DECOMPOSITIONS
from .tracing import INPUT, CheckFailed, Comparison, Target, compare

EXPORT_EXTRA = "pip install 'mambavision-train[export]'"
PACKAGES = ("onnx", "onnxscript", "onnxruntime")
OPSETS = range(18, 24)  # what torch's dynamo exporter writes (its translations start at 18); 20 by default
STANDARD_DOMAINS = ("", "ai.onnx")


def missing_packages() -> list[str]:
    return [p for p in PACKAGES if importlib.util.find_spec(p) is None]


def write_onnx(ep: ExportedProgram, path: Path, opset: int | None, tgt: Target, dims: dict[str, str],
               metadata: dict[str, str]):
    """``path`` (and ``path.data`` beside it for models over 2 GB, ONNX's protobuf limit)."""
    import onnx_ir as ir
    ep = ep.run_decompositions(DECOMPOSITIONS)  # the scan as aten ops: nothing left that ONNX does not know
    program = torch.onnx.export(ep, (), dynamo=True, opset_version=opset, input_names=[INPUT],
                                output_names=tgt.outputs, verbose=False)
    # The exporter names dynamic dimensions after torch's symbols (s77, ...): name them for the people reading it.
    graph = program.model.graph
    for value in [*graph.inputs, *(v for node in graph.all_nodes() for v in node.outputs)]:
        if value.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value in dims for d in value.shape):
            value.shape = ir.Shape([ir.SymbolicDim(dims[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in dims
                                    else d for d in value.shape])
    program.model.metadata_props.update(metadata)
    program.save(str(path), external_data=False)  # one file unless the weights pass 2 GB


def _nodes(graph):
    """Every node of a graph, those of its subgraphs (If, Loop, Scan bodies) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _nodes(sub)


@dataclass
class OnnxCheck:
    opset: int
    ops: Counter  # op type -> nodes
    comparison: Comparison

    def __str__(self) -> str:
        return (f"onnx.checker full check passed, {len(self.ops)} op types ({sum(self.ops.values())} nodes), all "
                f"in the standard domain; onnxruntime CPU vs PyTorch {self.comparison}")


def check_onnx(path: Path, tgt: Target, shapes: list[tuple], tolerance: float) -> OnnxCheck:
    import onnx
    import onnxruntime as ort
    onnx.checker.check_model(str(path), full_check=True)  # by path: works past 2 GB (external data)
    proto = onnx.load(str(path), load_external_data=False)
    nodes = [n for g in [proto.graph, *proto.functions] for n in _nodes(g)]
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in STANDARD_DOMAINS})
    if foreign:
        raise CheckFailed(f"{path} uses ops outside the standard ONNX domain: {', '.join(foreign)}")
    opset = next(o.version for o in proto.opset_import if o.domain in STANDARD_DOMAINS)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the threads this process was given, not every core
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy threads while PyTorch runs
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    comparison = compare(lambda x: session.run(None, {INPUT: x.numpy()}), tgt, shapes, tolerance,
                         f"{path} (onnxruntime)")
    return OnnxCheck(opset, Counter(n.op_type for n in nodes), comparison)
