"""Export for deployment (``python -m mambavision_train.export``, docs/export.md): the model a source names, traced
with torch.export, written as an ONNX graph of standard ops or as an ExportedProgram, and checked before it counts.

The pieces, for scripts: ``load_source`` (models/loading.py, what predict uses too) builds and loads the model; ``target`` and ``trace``
(trace.py) choose what is exported and trace it; ``write_onnx`` / ``check_onnx`` (onnx_graph.py) need the
``export`` extra (onnx, onnxscript, onnxruntime), imported only there."""

from .onnx_graph import EXPORT_EXTRA, check_onnx, write_onnx
from ..models.loading import Source, load_source
from ..errors import ExportError
from .tracing import CheckFailed, Target, check_pt2, target, trace, trace_size

__all__ = ["load_source", "Source", "target", "Target", "trace", "trace_size", "write_onnx", "check_onnx",
           "check_pt2", "ExportError", "CheckFailed", "EXPORT_EXTRA"]
