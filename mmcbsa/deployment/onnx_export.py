"""Export mmseg segmentors and mmpretrain classifiers to ONNX and check them in
onnxruntime (docs/deployment.md).

The exported graph takes the **normalised** image batch ``input (B, 3, H, W)`` (what the
model's data preprocessor hands the backbone) and returns, like mmseg's and mmpretrain's
deploy outputs:

* segmentors: ``logits (B, K, H, W)`` (the decode head's output resized to the input, as
  ``EncoderDecoder.encode_decode`` gives it) and ``label (B, 1, H, W)`` int64 (argmax;
  a one-channel head: its sigmoid above the head's ``threshold``);
* classifiers: ``logits (B, K)`` (``mode='tensor'``) and ``scores (B, K)`` (softmax).

Export is PyTorch's own: ``torch.export`` (non-strict) of the model inside
:func:`~mmcbsa.deployment.rewrites.export_rewrites`, then ``torch.onnx.export`` of that
program (dynamo exporter, ONNX opset 18 by default). The attentions see
``torch.compiler.is_exporting()`` and take their plain PyTorch forward math: no custom
autograd Function, no compiled CPU kernel, no Triton; MiTA takes its masked path (top-k
routing as ``TopK`` + gathers, one attention over a masked key table), the pooling of
representatives and landmarks becomes two small matrix products that hold for every grid.

Needs the ``deploy`` extra (``pip install -e .[deploy]``: onnx, onnxruntime, onnxscript).
"""
import contextlib
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .rewrites import export_rewrites

__all__ = ['INPUT_NAME', 'OUTPUT_NAMES', 'DeployModel', 'ExportReport', 'check_shape',
           'export_onnx', 'require_onnx', 'run_onnx', 'size_divisor', 'task_of',
           'time_onnx_and_torch', 'verify_onnx']

INPUT_NAME = 'input'
OUTPUT_NAMES = {'seg': ('logits', 'label'), 'cls': ('logits', 'scores')}
DEPLOY_PACKAGES = ('onnx', 'onnxruntime', 'onnxscript')
INSTALL_HINT = 'pip install -e ".[deploy]" (onnx, onnxruntime, onnxscript)'
MIN_OPSET = 18
# what torch.export raises when the model's code fixes a size that was asked to be dynamic
_SHAPE_ERRORS = (torch._dynamo.exc.UserError,
                 torch.fx.experimental.symbolic_shapes.ConstraintViolationError)


def require_onnx() -> None:
    """Raise one ``ValueError`` naming the missing packages and the install command
    when the ``deploy`` extra is not installed."""
    import importlib.util
    missing = [name for name in DEPLOY_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f'ONNX export needs {", ".join(missing)}: {INSTALL_HINT}')


def task_of(model: nn.Module) -> str:
    """``'seg'`` for an mmseg segmentor (``encode_decode``), ``'cls'`` for an mmpretrain
    classifier (``extract_feat`` + ``head``); ``ValueError`` otherwise."""
    if callable(getattr(model, 'encode_decode', None)) and hasattr(model, 'decode_head'):
        return 'seg'
    if callable(getattr(model, 'extract_feat', None)) and hasattr(model, 'head'):
        return 'cls'
    raise ValueError(f'{type(model).__name__} is neither an mmseg segmentor (encode_decode) '
                     'nor an mmpretrain classifier (extract_feat + head): nothing to export')


def size_divisor(model: nn.Module) -> int:
    """The stride of the backbone's patch embedding (input sizes must be multiples of
    it), read from the backbone: ``patch_size``, else the stride of
    ``patch_embed.projection``; 32 for backbones with neither (CNNs, Swin)."""
    backbone = getattr(model, 'backbone', model)
    size = getattr(backbone, 'patch_size', None)
    if size is None:
        proj = getattr(getattr(backbone, 'patch_embed', None), 'projection', None)
        size = getattr(proj, 'stride', None)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f'non-square patch size {tuple(size)} is not supported')
        size = size[0]
    return int(size) if size else 32


def check_shape(shape: Sequence[int], divisor: int, what: str = '--shape') -> Tuple[int, int]:
    """``(H, W)`` as ints if both are positive multiples of ``divisor`` (at least two
    patches each), else a ``ValueError`` naming ``what``."""
    if len(shape) != 2:
        raise ValueError(f'{what} needs two numbers H W, got {list(shape)}')
    h, w = (int(v) for v in shape)
    if h % divisor or w % divisor or h < 2 * divisor or w < 2 * divisor:
        raise ValueError(f'{what} {h} {w}: height and width must be multiples of the patch '
                         f'size {divisor}, at least {2 * divisor}')
    return h, w


class DeployModel(nn.Module):
    """The model as the exported graph sees it: normalised images in, deploy outputs
    out (see the module docstring). ``model`` must be in eval mode."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.task = task_of(model)

    def forward(self, input: Tensor) -> Tuple[Tensor, Tensor]:  # noqa: A002 (ONNX name)
        if self.task == 'cls':
            logits = self.model(input, mode='tensor')
            if isinstance(logits, (tuple, list)):  # heads that return several outputs
                logits = logits[-1]
            return logits, F.softmax(logits, dim=1)
        size = input.shape[2:]  # torch.Size: mmseg resizes the logits to it
        logits = self.model.encode_decode(
            input, [dict(img_shape=size, ori_shape=size, pad_shape=size)])
        if logits.shape[1] == 1:  # binary head (out_channels=1)
            threshold = getattr(self.model.decode_head, 'threshold', 0.5)
            return logits, (logits.sigmoid() > threshold).long()
        return logits, logits.argmax(dim=1, keepdim=True)


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote."""
    path: str
    task: str
    shape: Tuple[int, int]
    batch: int
    dynamic: bool
    opset: int
    size_bytes: int
    seconds: float
    input_name: str = INPUT_NAME
    output_names: Tuple[str, ...] = field(default_factory=tuple)


def _dynamic_shapes(divisor: int):
    dim = torch.export.Dim
    # multiples of the patch size, at least 2 patches (size-1 dimensions would be fixed
    # by the tracer); batch from 1
    return {INPUT_NAME: {0: dim('batch', min=1, max=4096),
                         2: divisor * dim('patch_rows', min=2, max=4096),
                         3: divisor * dim('patch_cols', min=2, max=4096)}}


def export_onnx(model: nn.Module, path: str, shape: Sequence[int], batch: int = 1,
                dynamic: bool = False, opset: int = 18) -> ExportReport:
    """Export ``model`` (an mmseg segmentor or mmpretrain classifier, on the CPU) to
    the ONNX file ``path``.

    Args:
        model: the model; put in eval mode here.
        path: output ``.onnx`` file.
        shape: ``(H, W)`` of the traced input, multiples of :func:`size_divisor`.
        batch: images in the traced batch.
        dynamic: batch, height and width symbolic in the graph (any batch, any
            multiple of the patch size); otherwise the graph is fixed to
            ``(batch, 3, H, W)``.
        opset: ONNX opset version.

    Raises:
        ValueError: a shape that is not a multiple of the patch size, a model that is
            neither a segmentor nor a classifier, the deploy extra missing, or a model
            whose graph stays fixed to the traced size although ``dynamic`` was asked
            (naming the size check that fixed it).
    """
    import os
    require_onnx()
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f'--batch must be a positive integer, got {batch!r}')
    import onnx
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        # below 18 the exporter converts down, which fails for these graphs (and then
        # silently keeps opset 18)
        raise ValueError(f'--opset must be between {MIN_OPSET} (the exporter\'s lowest) and '
                         f'{newest} (the installed onnx), got {opset!r}')
    divisor = size_divisor(model)
    h, w = check_shape(shape, divisor)
    wrapper = DeployModel(model.eval()).eval()
    # a dynamic batch is traced with 2 images (a batch of 1 would be fixed to 1)
    example = torch.randn(max(batch, 2) if dynamic else batch, 3, h, w,
                          generator=torch.Generator().manual_seed(0))
    dynamic_shapes = _dynamic_shapes(divisor) if dynamic else None
    start = time.perf_counter()
    with torch.no_grad(), export_rewrites(), _quiet_optimizer():
        try:
            program = torch.export.export(wrapper, (example, ),
                                          dynamic_shapes=dynamic_shapes, strict=False)
        except _SHAPE_ERRORS as exc:  # a size the model's code fixes (e.g. mmseg's Swin)
            raise ValueError(f'the model cannot be exported with a dynamic batch and size: '
                             f'{_first_line(exc)}; export it without --dynamic-shape'
                             ) from None
        if dynamic:
            _check_not_fixed(program, example, divisor)
        onnx_program = torch.onnx.export(
            program, (example, ), dynamo=True, opset_version=opset,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES[wrapper.task]),
            dynamic_shapes=dynamic_shapes, verbose=False)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise ValueError(f'--out {path}: cannot create {directory}: '
                         f'{exc.strerror or exc}') from None
    onnx_program.save(path)
    if dynamic:
        _check_onnx_at_another_size(path, wrapper, example, divisor)
    return ExportReport(path, wrapper.task, (h, w), batch, dynamic, opset,
                        os.path.getsize(path), time.perf_counter() - start,
                        output_names=OUTPUT_NAMES[wrapper.task])


@contextlib.contextmanager
def _quiet_optimizer():
    """The ONNX optimizer warns once per ``Split`` node that it does not fold (it is
    not a constant): silenced while exporting."""
    logger = logging.getLogger('onnxscript.optimizer')
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _other_input(example: Tensor, divisor: int) -> Tensor:
    """A batch one larger and an image one patch taller, two wider than ``example``."""
    b, c, h, w = example.shape
    return torch.randn(b + 1, c, h + divisor, w + 2 * divisor,
                       generator=torch.Generator().manual_seed(1))


def _check_onnx_at_another_size(path: str, wrapper: nn.Module, example: Tensor,
                                divisor: int, tolerance: float = 1e-2) -> None:
    """The written graph in onnxruntime against the model at another batch and size. An
    operator whose ONNX translation keeps the traced size (the exporter drops shape
    checks) gives other results there: the file is removed and a ``ValueError`` says so.
    ``tolerance`` bounds ``max |onnx - torch| / max |torch|`` of the logits, far above
    float32 rounding and MiTA's near-tied routing decisions (docs/deployment.md)."""
    import os
    x = _other_input(example, divisor)
    with torch.no_grad():
        expected = wrapper(x)[0]
    scale = float(expected.abs().max()) or 1.0
    try:
        got = run_onnx(path, x)[0]
    except Exception as exc:  # onnxruntime's own error types (e.g. an index out of range)
        problem = f'onnxruntime fails: {_first_line(exc)}'
    else:
        error = (float((got - expected).abs().max()) if got.shape == expected.shape
                 else float('inf'))
        problem = (None if error <= tolerance * scale else
                   f'max abs error {error:.3g} for logits up to {scale:.3g}')
    if problem is not None:
        os.remove(path)
        raise ValueError(f'the dynamic-shape graph differs from the model at input '
                         f'{tuple(x.shape)} ({problem}): an operator kept the traced size; '
                         'export it without --dynamic-shape')


def _check_not_fixed(program, example: Tensor, divisor: int) -> None:
    """Run the exported program on a batch of another size: the size checks that the
    tracer added (``Guard failed``) fail there when the graph is fixed to the traced
    size, which the ONNX graph would silently be."""
    try:
        program.module()(_other_input(example, divisor))
    except (AssertionError, RuntimeError) as exc:
        raise ValueError(f'the model traces to a graph fixed to input {tuple(example.shape)} '
                         f'({_first_line(exc)}); export it without --dynamic-shape') from None


def _session(path: str, threads: Optional[int] = None):
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def run_onnx(path: str, images: Tensor, session=None) -> List[Tensor]:
    """The ONNX model's outputs for ``images (B, 3, H, W)`` (normalised) in
    onnxruntime on the CPU, as tensors."""
    session = session or _session(path)
    return [torch.from_numpy(o) for o in
            session.run(None, {INPUT_NAME: images.detach().float().cpu().numpy()})]


@torch.no_grad()
def verify_onnx(path: str, model: nn.Module, images: Sequence[Tensor]) -> List[Dict]:
    """Compare onnxruntime with the PyTorch model (eager, float32) on each batch of
    ``images``.

    Returns:
        One dict per batch: ``shape``, ``max_abs_error`` (of the logits) and, for a
        segmentor, ``label_mismatch`` (share of pixels whose label differs) or, for a
        classifier, ``max_abs_error_scores``.
    """
    wrapper = DeployModel(model.eval()).eval()
    session = _session(path)
    results = []
    for x in images:
        expected = wrapper(x)
        got = run_onnx(path, x, session)
        if [tuple(g.shape) for g in got] != [tuple(e.shape) for e in expected]:
            raise ValueError(f'{path}: output shapes {[tuple(g.shape) for g in got]} differ '
                             f'from PyTorch\'s {[tuple(e.shape) for e in expected]} for '
                             f'input {tuple(x.shape)}')
        row = dict(shape=tuple(x.shape),
                   max_abs_error=float((got[0] - expected[0]).abs().max()))
        if wrapper.task == 'seg':
            row['label_mismatch'] = float((got[1] != expected[1]).float().mean())
        else:
            row['max_abs_error_scores'] = float((got[1] - expected[1]).abs().max())
        results.append(row)
    return results


@torch.no_grad()
def time_onnx_and_torch(path: str, model: nn.Module, images: Tensor,
                        repeats: int = 10, warmup: int = 2) -> Dict[str, float]:
    """Median wall time of one forward in onnxruntime (CPU, as many threads as PyTorch
    uses) and in PyTorch eager (CPU, float32, the deployed forward), in the same process,
    alternating. Returns ``ort_ms``, ``torch_ms`` and ``ratio = ort / torch``."""
    wrapper = DeployModel(model.eval()).eval()
    session = _session(path, threads=torch.get_num_threads())
    feed = {INPUT_NAME: images.float().cpu().numpy()}
    times = {'ort': [], 'torch': []}
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        t1 = time.perf_counter()
        wrapper(images)
        t2 = time.perf_counter()
        if i >= warmup:
            times['ort'].append(t1 - t0)
            times['torch'].append(t2 - t1)
    ort_ms = 1e3 * statistics.median(times['ort'])
    torch_ms = 1e3 * statistics.median(times['torch'])
    return dict(ort_ms=ort_ms, torch_ms=torch_ms, ratio=ort_ms / torch_ms)
