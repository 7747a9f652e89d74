"""Deployment: ONNX export of mmcbsa's segmentors and classifiers (docs/deployment.md).

Layer 3 (docs/architecture.md): imports the models and mmcbsa.analysis.runtime's builders
only through the tools; onnx / onnxruntime are imported when a function needs them.
"""
from .onnx_export import (INPUT_NAME, OUTPUT_NAMES, DeployModel, ExportReport, check_shape,
                          export_onnx, require_onnx, run_onnx, size_divisor, task_of,
                          time_onnx_and_torch, verify_onnx)
from .rewrites import export_rewrites, resize_pos_embed_always

__all__ = ['INPUT_NAME', 'OUTPUT_NAMES', 'DeployModel', 'ExportReport', 'check_shape',
           'export_onnx', 'export_rewrites', 'require_onnx', 'resize_pos_embed_always',
           'run_onnx', 'size_divisor', 'task_of', 'time_onnx_and_torch', 'verify_onnx']
