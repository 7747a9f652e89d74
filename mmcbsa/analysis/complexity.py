"""Parameters and FLOPs of any mmcbsa / mmseg / mmpretrain model: the one
implementation behind ``tools/analysis_tools/get_flops.py`` and the metafiles'
``Metadata: FLOPs / Parameters``.

**Convention** (mmengine / fvcore, and OpenMMLab's metafiles): one fused multiply-add
counts as ONE FLOP. Matrix products (``linear``, ``matmul``, ``bmm``, ``baddbmm``,
``einsum``), convolutions, norms (a few per element), interpolation and adaptive
pooling (one per input element) are counted; purely element-wise ops (softmax,
activations, additions, scaling) and data movement (gathers, top-k, sorting) are not —
they are *listed* (see :func:`model_complexity`'s ``uncounted``), never silently
dropped. Papers that report "FLOPs" as ``2 ×`` multiply-adds (the CBSA paper's tables)
are matched by doubling this count.

mmengine's jit-based ``FlopAnalyzer`` has no handle for these operators (the first
carries most of an attention layer's products); they are added here:

* ``aten::scaled_dot_product_attention`` (MSSA, MHSA, the DEPICT decoders, MiTA's
  block attention): ``q kᵀ`` and ``softmax(·) v`` —
  ``B·H·L·S·(E + E_v)`` for ``q (B, H, L, E)``, ``k (B, H, S, E)``, ``v (B, H, S, E_v)``
  (:func:`sdpa_flop_jit`). Without it mmengine reports 32.7 G instead of 35.2 G for
  DEPICT-SA on ViT-S at 512² (the decoder's three MSSA layers over 1024 + 150 tokens).
* ``aten::_native_multi_head_attention``: ``nn.MultiheadAttention``'s fused inference
  path (taken under ``torch.no_grad()`` in eval mode) — projections and both
  products (:func:`native_mha_flop_jit`).
* ``aten::baddbmm`` / ``aten::baddbmm_`` (``nn.MultiheadAttention`` with a mask; MiTA's
  dense path accumulates in place): as ``bmm``.
* ``aten::upsample_bicubic2d`` (mmseg's ViT resizing its position embedding): 16 per
  output element, as mmengine counts bilinear interpolation 4.

``aten::matmul``/``aten::bmm`` are re-registered with a count from the output shape
(``prod(out) · K``), which stays exact when ``matmul`` broadcasts its first operand
(mmengine multiplies the first operand's size by the last dimension of the second).

mmcbsa's attentions are traced through plain ops: CBSA's hand-written autograd path is
only used when training eagerly (it is bypassed under ``torch.jit`` tracing), so each
CBSA layer counts ``2·N·C·Hp`` (projections) ``+ 3·N·m·Hp + 2·m²·Hp`` (extract,
contract, broadcast) ``+ Hp·h·w`` (pooling the representatives). MiTA counts the
products our exact implementation performs: ``3·N·M·Hp`` (landmark logits, agent
values, gate) plus its block attention ``slots·(M + k)·2p`` per head, where ``slots``
is ``N`` rounded up per expert to blocks of ``query_block_size`` queries — routing
dependent, and above MiTA's nominal ``N·(M + k)·2p`` by the padding of each expert's
last block (at most ``M·(T − 1)`` slots per head; ``query_block_size=1`` gives exactly
the nominal count).
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.analysis import FlopAnalyzer, parameter_count
from mmengine.analysis.jit_handles import elementwise_flop_counter, get_shape
from mmengine.analysis.print_helper import complexity_stats_table
from mmengine.model import BaseModel

__all__ = [
    'sdpa_flop_jit', 'native_mha_flop_jit', 'baddbmm_flop_jit', 'matmul_flop_jit',
    'EXTRA_OP_HANDLES', 'NO_MAC_OPS', 'flop_analyzer', 'model_complexity',
    'build_model_from_config', 'input_shape_from_config', 'FLOPS_CONVENTION'
]

FLOPS_CONVENTION = ('FLOPs = multiply-adds (one fused multiply-add = 1 FLOP; '
                    'mmengine/fvcore and OpenMMLab metafiles). Papers that report '
                    '2 x multiply-adds (e.g. CBSA) correspond to 2 x this number.')


def _prod(sizes: Sequence[int]) -> int:
    return int(math.prod(int(s) for s in sizes))


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """FLOPs of ``scaled_dot_product_attention(q, k, v)``.

    ``q (..., L, E)``, ``k (..., S, E)``, ``v (..., S, E_v)``: ``q kᵀ`` is
    ``L·S·E`` multiply-adds per batch element and ``softmax(·) v`` ``L·S·E_v``.
    """
    q, k, v = (get_shape(x) for x in inputs[:3])
    length, dims, keys, dims_v = q[-2], q[-1], k[-2], v[-1]
    return _prod(q[:-2]) * length * keys * (dims + dims_v)


def native_mha_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """FLOPs of ``aten::_native_multi_head_attention`` (``nn.MultiheadAttention``'s
    fused path): inputs ``query (B, L, E)``, ``key (B, S, E)``, ``value (B, S, E)``,
    ``embed_dim``, ``num_heads``, ``qkv_weight (3E, E)``, ...

    ``L·E² + 2·S·E²`` (q, k, v projections) ``+ L·S·E`` (``q kᵀ`` over all heads)
    ``+ L·S·E`` (attention times values) ``+ L·E²`` (output projection), per batch
    element.
    """
    query, key = get_shape(inputs[0]), get_shape(inputs[1])
    batch = _prod(query[:-2])
    length, keys, dims = query[-2], key[-2], query[-1]
    proj = (length + 2 * keys) * dims * dims + length * dims * dims
    return batch * (proj + 2 * length * keys * dims)


def baddbmm_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``baddbmm(input, b1 (B, n, k), b2 (B, k, m))``: ``B·n·k·m`` (as ``bmm``)."""
    b1, b2 = get_shape(inputs[1]), get_shape(inputs[2])
    return _prod(b1) * b2[-1]


def matmul_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``matmul`` / ``bmm`` / ``mm``: ``prod(output shape) · K`` with ``K`` the
    contracted size (exact under broadcasting of either operand)."""
    first, out = get_shape(inputs[0]), get_shape(outputs[0])
    return _prod(out) * first[-1]


#: Handles mmcbsa adds to (or replaces in) mmengine's ``FlopAnalyzer``.
EXTRA_OP_HANDLES = {
    'aten::scaled_dot_product_attention': sdpa_flop_jit,
    'aten::_native_multi_head_attention': native_mha_flop_jit,
    'aten::baddbmm': baddbmm_flop_jit,
    'aten::baddbmm_': baddbmm_flop_jit,
    'aten::matmul': matmul_flop_jit,
    'aten::bmm': matmul_flop_jit,
    # mmseg's ViT resizes its position embedding bicubically for other input sizes:
    # 16 taps per output element (mmengine counts bilinear as 4)
    'aten::upsample_bicubic2d': elementwise_flop_counter(0, 16),
}

#: Operators that perform no multiply-adds by the convention (element-wise arithmetic,
#: reductions, data movement, routing). Anything else that the analyzer could not count
#: is reported as *unknown*.
NO_MAC_OPS = frozenset('aten::' + op for op in (
    'add add_ sub sub_ rsub mul mul_ div div_ neg abs square sqrt rsqrt pow reciprocal '
    'exp log softmax log_softmax gelu silu sigmoid tanh erf hardtanh leaky_relu elu '
    'clamp_min clamp_max where addcmul addcmul_ lerp mean sum linalg_vector_norm norm '
    'expand_as unflatten repeat repeat_interleave topk argmax argmin argsort sort '
    'searchsorted index_select cumsum scatter scatter_ fill_ masked_fill_ '
    'max_pool2d avg_pool2d pad im2col col2im one_hot unfold rand randn rand_like '
    'randn_like bernoulli_ feature_dropout alpha_dropout type_as embedding numel ne lt le '
    'logical_and logical_or logical_not linspace eye diagonal'
).split()) | {'prim::PythonOp._MoveRows'}  # MiTA's one-to-one row move (a gather)


class _TensorForward(nn.Module):
    """Forward wrapper returning tensors (jit tracing needs tensors, not data samples).

    mmengine ``BaseModel`` s run ``forward(inputs, mode='tensor')``: mmpretrain
    classifiers give backbone + neck + head logits, mmseg segmentors ``_forward`` —
    encoder + decode head at the input size (no auxiliary head, no slide/whole
    inference, no resizing of the logits). Plain modules run ``forward(x)``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        if isinstance(self.model, BaseModel):
            return self.model(x, mode='tensor')
        return self.model(x)


def flop_analyzer(model: nn.Module, inputs: Union[torch.Tensor, Tuple]) -> FlopAnalyzer:
    """mmengine ``FlopAnalyzer`` over ``model`` with :data:`EXTRA_OP_HANDLES` and its
    warnings silenced (uncounted operators are reported by :func:`model_complexity`).

    Args:
        model: an mmengine ``BaseModel`` (run with ``mode='tensor'``) or any module.
        inputs: one input tensor, or the tuple of positional inputs of a plain module.
    """
    wrapped = _TensorForward(model) if isinstance(model, BaseModel) else model
    args = (inputs, ) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    analyzer = FlopAnalyzer(wrapped, args)
    analyzer.set_op_handle(**EXTRA_OP_HANDLES)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    return analyzer


def model_complexity(model: nn.Module, input_shape: Sequence[int] = (3, 224, 224),
                     batch_size: int = 1, seed: int = 0,
                     table_depth: Optional[int] = None) -> Dict[str, Any]:
    """Count parameters and FLOPs of ``model`` on one ``(batch_size, *input_shape)``
    input (standard-normal values from a generator seeded with ``seed``, so
    data-dependent counts such as MiTA's routing are reproducible for fixed weights).

    Args:
        model: the model (eval mode is used for the count, then restored).
        input_shape: ``(C, H, W)`` of one input.
        batch_size: leading batch size.
        seed: seed of the random input.
        table_depth: also return mmengine's per-module table down to this depth.

    Returns:
        ``dict(params, flops, by_operator, uncounted, unknown[, table])``: parameter
        count; FLOPs (multiply-adds, module docstring); FLOPs per operator; every
        operator the count skipped (name -> number of calls); the subset of those that
        is not a known no-multiply-add operator (:data:`NO_MAC_OPS`).
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) < 1 or any(s <= 0 for s in shape) or batch_size <= 0:
        raise ValueError(f'input_shape must be positive sizes (C, H, W), got {shape} '
                         f'with batch_size={batch_size}')
    gen = torch.Generator().manual_seed(seed)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    inputs = torch.randn((batch_size, ) + shape, generator=gen).to(device)
    was_training = model.training
    model.eval()
    try:
        analyzer = flop_analyzer(model, inputs)
        flops = int(round(analyzer.total()))  # einsum's handle returns floats
        uncounted = dict(sorted(analyzer.unsupported_ops().items()))
        result = dict(params=parameter_count(model)[''], flops=flops,
                      by_operator=dict(analyzer.by_operator()), uncounted=uncounted,
                      unknown={k: v for k, v in uncounted.items() if k not in NO_MAC_OPS})
        if table_depth is not None:
            # a BaseModel is wrapped once (_TensorForward): one more level for its children
            depth = table_depth + int(isinstance(model, BaseModel))
            result['table'] = complexity_stats_table(analyzer, max_depth=depth,
                                                     show_param_shapes=False)
    finally:
        model.train(was_training)
    # backwards-compatible name (all skipped operators)
    result['unsupported'] = result['uncounted']
    return result


def build_model_from_config(cfg) -> nn.Module:
    """Build ``cfg.model`` in the registry of the config's ``default_scope`` (mmseg or
    mmpretrain), in eval mode, with mmseg's ``SyncBN`` reverted to ``BatchNorm`` (CPU).

    ``init_weights`` is not called: no pretrained checkpoint is downloaded. A model the
    config cannot build (an unknown keyword, a failed argument check of a library class)
    is a ``ValueError``.
    """
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import DefaultScope
    scope = cfg.get('default_scope', None)
    if scope == 'mmseg':
        from mmseg.registry import MODELS
    elif scope == 'mmpretrain':
        from mmpretrain.registry import MODELS
    else:
        raise ValueError(f"default_scope: the config's default_scope must be 'mmseg' or "
                         f"'mmpretrain', got {scope!r}")
    model_cfg = cfg.model.copy()
    if scope == 'mmpretrain' and 'data_preprocessor' not in model_cfg:
        model_cfg['data_preprocessor'] = cfg.get('data_preprocessor', None)
    with DefaultScope.overwrite_default_scope(scope):
        try:
            model = MODELS.build(model_cfg)
        except (TypeError, AssertionError) as exc:
            raise ValueError(f"the config's model cannot be built: {type(exc).__name__}: "
                             f'{exc or "an argument check failed"}') from exc
    return revert_sync_batchnorm(model).eval()


def _size_pair(value, name: str) -> Tuple[int, int]:
    """int -> (s, s); (a, b) -> (a, b)."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f'{name}: cannot read an input size from {value!r}')


def input_shape_from_config(cfg) -> Tuple[int, int]:
    """The ``(H, W)`` a config's model is counted at by default.

    mmseg configs: the training crop, ``model.data_preprocessor.size`` (``(h, w)``).
    mmpretrain configs: the test pipeline's ``CenterCrop`` (``crop_size``; mmcv's
    ``(w, h)`` order for pairs), else its last ``Resize``/``RandomResizedCrop``
    ``scale``. Raises ``ValueError`` (asking for an explicit shape) otherwise.
    """
    scope = cfg.get('default_scope', None)
    if scope == 'mmseg':
        size = cfg.model.get('data_preprocessor', {}).get('size', None)
        if size is None:
            size = cfg.get('crop_size', None)
        if size is not None:
            return _size_pair(size, 'model.data_preprocessor.size')
    else:
        pipeline = []
        loader = cfg.get('test_dataloader', None) or {}
        pipeline = loader.get('dataset', {}).get('pipeline', None) or \
            cfg.get('test_pipeline', None) or []
        for step in reversed(list(pipeline)):
            kind = step.get('type', '')
            if kind == 'CenterCrop' and 'crop_size' in step:
                w, h = _size_pair(step['crop_size'], 'CenterCrop.crop_size')
                return h, w
            if kind in ('Resize', 'RandomResizedCrop') and 'scale' in step:
                w, h = _size_pair(step['scale'], f'{kind}.scale')
                return h, w
    raise ValueError('shape: cannot infer the input size from the config '
                     '(no crop size / test-pipeline crop); pass it explicitly (--shape H W)')
