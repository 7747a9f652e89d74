"""Look inside a model in one forward pass, without editing it (docs/mechanisms.md §9).

:class:`AttentionCapture` attaches forward hooks to every attention module it knows
and, after each call, asks the module for its maps (``module.attention_maps(...)`` with
the arguments of that call: a plain function of the inputs; the models keep no
recording state). After one forward pass it holds, per attention call (in call order):

* the **attention input projection** ``(B, N, H·p)`` used for the coding rate;
* the **attention maps** of docs/mechanisms.md §9 on the patch grid;

and, per ISTA call, its **output** (for the sparsity). Nothing in the models is
re-implemented: the maps are what the modules' ``attention_maps`` return, or, for
attentions without one (mmseg / mmpretrain ViTs), are the definition of their map
(``softmax(q kᵀ/√p)``, query row) applied to the captured ``q, k``.

What "attention input projection" means per mechanism (the features whose coding rate
is measured; the reference ``crate_hook.py`` hooks CRATE's single projection ``U``):

=========================================  ==============================================
module                                     projection
=========================================  ==============================================
``CBSA``, ``MSSA``, ``TSSA``               ``x Uᵀ`` (``in_proj``; query = key = value)
``MHSA``, ``MiTA``, ``AdaptedCBSA``,       the **value** part of ``qkv(x)`` (``qkvg`` in
mmpretrain ``MultiheadAttention``,         gated MiTA): each head's output is a mixture
torch ``nn.MultiheadAttention`` (mmseg),   of its values, so the value subspaces play
the adapted ViTs' layers                   the role of CRATE's ``U_h``
``PrimalAttention``                        the query part of ``qk(x)`` (it has no values)
=========================================  ==============================================

All ``N`` tokens of the call are kept (prefix tokens included, as the reference does with
CLS); for a cross-attention call (DEPICT-CA's class queries) it is the queries' projection.

Maps (each ``(B, H, K, h, w)`` over the ``h × w`` patch grid, other tokens removed; the
patches are the last ``h·w`` tokens — prefix layout, as in mmcbsa and the ViTs — except in
:data:`SUFFIX_LAYOUT_MODULES`, where they come first):

* ``'cls'`` — the CLS row (query token 0) of the token-to-token attention; used when
  the layer has exactly one prefix token (or ``query='cls'``). Otherwise ``'mean'``:
  the mean over the patch queries (how much attention each patch receives). Softmax
  attention: its ``N × N`` softmax. CBSA: ``AᵀA`` (the reference ``return_attn``).
  AdaptedCBSA and the adapted layers of ``AdaptedVisionTransformer`` (mmpretrain and
  mmseg): ``softmax_reps(q Q0ᵀ) · softmax_tokens(Q0 kᵀ)``.
* ``'reps'`` (CBSA, AdaptedCBSA) — each representative's extraction row ``A[r]``, ``K = m``.
* ``'clusters'`` — a partition of the patches (integer labels, ``K = 1``): CBSA
  ``argmax_r A[r, n]`` per head; MiTA the expert of each token per head; TSSA the
  group ``argmax_h π[h, n]`` (one partition, ``H = 1``).
* ``'groups'`` (TSSA) — the soft assignment ``π[h]`` of each token to group ``h``.
* ``'routed_keys'`` (MiTA) — ``K = M`` indicator maps of the keys each expert routes to.

:data:`MECHANISMS` is the one table from module class to what is captured; a new
attention is one entry.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmcbsa.models.attentions.base import split_heads, warn_once

__all__ = ['AttentionCapture', 'LayerRecord', 'TensorRecord', 'Mechanism', 'MECHANISMS',
           'QUERY_MODES', 'mechanism_of', 'layer_labels']

QUERY_MODES = ('auto', 'cls', 'mean')
Grid = Tuple[int, int]


@dataclass
class LayerRecord:
    """What one attention call produced.

    Attributes:
        name: module path in the model (``'backbone.layers.0.attn'``).
        type: the module's class name.
        num_heads: heads ``H``.
        num_tokens: tokens ``N`` of its input.
        hw_shape: patch grid ``(h, w)``, or ``None`` when unknown (then no maps).
        num_prefix: tokens that are not patches (``N − h·w``: CLS, class embeddings),
            or ``None``.
        query: ``'cls'`` or ``'mean'`` — which row the token-to-token map is.
        projection: the attention input projection ``(B, N, H·p)`` (detached), or ``None``.
        maps: ``{kind: (B, H, K, h, w)}`` (see the module docstring).
    """
    name: str
    type: str
    num_heads: int
    num_tokens: int
    hw_shape: Optional[Grid] = None
    num_prefix: Optional[int] = None
    query: Optional[str] = None
    projection: Optional[Tensor] = None
    maps: Dict[str, Tensor] = field(default_factory=dict)

    @property
    def group(self) -> str:
        """Top-level part of the model the layer belongs to (``backbone``, ``decode_head``)."""
        return self.name.split('.', 1)[0]


@dataclass
class TensorRecord:
    """Output of one call of a captured module (ISTA): ``name``, ``type``, ``output``."""
    name: str
    type: str
    output: Tensor


def layer_labels(records: List[LayerRecord]) -> List[str]:
    """``'<group>.<i>'`` per record: the ``i``-th attention call (from 0) in the model's
    top-level part ``group`` — the layer names the tools and the hook use."""
    counts: Dict[str, int] = {}
    labels = []
    for rec in records:
        i = counts.get(rec.group, 0)
        labels.append(f'{rec.group}.{i}')
        counts[rec.group] = i + 1
    return labels


class _Call:
    """State of one attention call between its pre- and post-forward hook."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.module, self.args, self.kwargs = module, args, kwargs
        self.children: Dict[str, Tensor] = {}
        self.hw_shape: Optional[Grid] = None
        self.num_prefix: Optional[int] = None
        self.patch_start = 0  # index of the first patch token (num_prefix, or 0 if suffix)
        self.query = 'cls'

    def arg(self, index: int, name: str) -> Any:
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[index] if len(self.args) > index else None


ProjectionFn = Callable[[_Call], Optional[Tensor]]
MapsFn = Callable[[_Call], Dict[str, Tensor]]


@dataclass(frozen=True)
class Mechanism:
    """How to read one attention class.

    Attributes:
        projection: ``call -> (B, N, H·p)`` attention input projection.
        maps: ``call -> {kind: (B, H, K, h, w)}``, or ``None`` (no maps).
        children: names of child modules whose (first) output the two functions use.
    """
    projection: Optional[ProjectionFn]
    maps: Optional[MapsFn] = None
    children: Tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------
# grid helpers
# ----------------------------------------------------------------------------------------


def _as_grid(value: Any) -> Optional[Grid]:
    if isinstance(value, (tuple, list, torch.Size)) and len(value) == 2:
        try:
            return int(value[0]), int(value[1])
        except (TypeError, ValueError):
            return None
    return None


def _patches(t: Tensor, call: _Call) -> Tensor:
    """``(B, H, K, N)`` over all tokens -> ``(B, H, K, h, w)`` over the patches."""
    h, w = call.hw_shape
    return t[..., call.patch_start:call.patch_start + h * w].reshape(*t.shape[:-1], h, w)


def _query_rows(attn: Tensor, call: _Call) -> Tensor:
    """Token-to-token ``(B, H, N, L)`` -> the query row ``(B, H, 1, L)``."""
    if call.query == 'cls':
        return attn[:, :, :1]
    n = call.hw_shape[0] * call.hw_shape[1]
    return attn[:, :, call.patch_start:call.patch_start + n].mean(2, keepdim=True)


def _query_weights(t: Tensor, call: _Call) -> Tensor:
    """``(B, H, X, N)`` indexed by the query token -> ``(B, H, X, 1)`` for the query row
    (token 0, or the mean over the patch tokens)."""
    if call.query == 'cls':
        return t[..., :1]
    n = call.hw_shape[0] * call.hw_shape[1]
    return t[..., call.patch_start:call.patch_start + n].mean(-1, keepdim=True)


# ----------------------------------------------------------------------------------------
# projections
# ----------------------------------------------------------------------------------------


def _child_output(child: str) -> ProjectionFn:
    """The output of child module ``child`` (e.g. ``in_proj``)."""
    return lambda call: call.children.get(child)


def _child_part(child: str, index: int, parts: int) -> ProjectionFn:
    """Part ``index`` of ``parts`` equal chunks of child ``child``'s output (``qkv``)."""

    def fn(call: _Call) -> Optional[Tensor]:
        out = call.children.get(child)
        return None if out is None else out.chunk(parts, dim=-1)[index]

    return fn


def _input_linear(child: str) -> ProjectionFn:
    """``x Wᵀ`` with the weight of child ``child``, for modules that use the weight
    directly instead of calling the child (CBSA's channels-first kernels)."""

    def fn(call: _Call) -> Tensor:
        linear = getattr(call.module, child)
        return F.linear(call.arg(0, 'x'), linear.weight, linear.bias)

    return fn


def _mita_value(call: _Call) -> Tensor:
    """MiTA: the value part of ``x W_inᵀ + b`` (``qkv``, or ``qkvg`` when gated); MiTA
    uses the weight directly rather than calling the child module."""
    m = call.module
    proj = m.in_proj
    out = F.linear(call.arg(0, 'x'), proj.weight, proj.bias)
    return out.chunk(4 if m.gate else 3, dim=-1)[2]


def _torch_mha_qkv(call: _Call) -> Tuple[Tensor, Tensor, Tensor]:
    """``q, k, v`` ``(B, L, E)`` of a ``torch.nn.MultiheadAttention`` call, from its
    inputs and its projection weights (how the module projects them)."""
    m = call.module
    q_in, k_in, v_in = call.arg(0, 'query'), call.arg(1, 'key'), call.arg(2, 'value')
    k_in = q_in if k_in is None else k_in
    v_in = k_in if v_in is None else v_in
    if not m.batch_first:
        q_in, k_in, v_in = (t.transpose(0, 1) for t in (q_in, k_in, v_in))
    if getattr(m, '_qkv_same_embed_dim', True):
        wq, wk, wv = m.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    bq = bk = bv = None
    if m.in_proj_bias is not None:
        bq, bk, bv = m.in_proj_bias.chunk(3)
    return F.linear(q_in, wq, bq), F.linear(k_in, wk, bk), F.linear(v_in, wv, bv)


def _torch_mha_value(call: _Call) -> Tensor:
    return _torch_mha_qkv(call)[2]


# ----------------------------------------------------------------------------------------
# maps
# ----------------------------------------------------------------------------------------


def _own_maps(call: _Call) -> Dict[str, Tensor]:
    """``module.attention_maps(...)`` with the arguments of the call (mmcbsa's
    attentions; ``{}`` for modules without it)."""
    fn = getattr(call.module, 'attention_maps', None)
    return {} if fn is None else fn(*call.args, **call.kwargs)


def _softmax_maps(call: _Call) -> Dict[str, Tensor]:
    """MSSA / MHSA: their ``(B, H, N, L)`` softmax, query row (self-attention)."""
    attn = _own_maps(call).get('attention')
    if attn is None or attn.shape[-1] != attn.shape[-2]:
        return {}  # cross-attention (DEPICT-CA classes over patches): no token grid
    return {call.query: _patches(_query_rows(attn, call), call)}


def _softmax_row_maps(q: Tensor, k: Tensor, scale: float, call: _Call) -> Dict[str, Tensor]:
    """Query row of ``softmax(q kᵀ · scale)`` for ``q, k`` ``(B, H, N, p)``."""
    if q.shape[2] != k.shape[2]:
        return {}
    if call.query == 'cls':
        row = torch.softmax((q[:, :, :1] @ k.transpose(-2, -1)) * scale, dim=-1)
    else:
        row = _query_rows(torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1), call)
    return {call.query: _patches(row, call)}


def _qkv_maps(child: str) -> MapsFn:
    """mmpretrain ``MultiheadAttention``: ``q, k`` from the captured ``qkv(x)``."""

    def fn(call: _Call) -> Dict[str, Tensor]:
        m = call.module
        qkv = call.children.get(child)
        if qkv is None:
            return {}
        q, k, v = (split_heads(t, m.num_heads) for t in qkv.chunk(3, dim=-1))
        core = _adapted_core(m)
        if core is not None:  # an adapted layer: the maps of its core on these heads
            return _adapted_maps(core.attention_maps(q, k, v), call)
        sdpa = getattr(m, 'scaled_dot_product_attention', None)
        scale = getattr(sdpa, 'keywords', {}).get('scale') or q.shape[-1] ** -0.5
        return _softmax_row_maps(q, k, scale, call)

    return fn


def _torch_mha_maps(call: _Call) -> Dict[str, Tensor]:
    m = call.module
    if getattr(m, 'bias_k', None) is not None:
        warn_once('capture-mha-bias-kv', 'AttentionCapture: nn.MultiheadAttention with '
                  'add_bias_kv has an extra key; its maps are not drawn')
        return {}
    q, k, _ = _torch_mha_qkv(call)
    q, k = split_heads(q, m.num_heads), split_heads(k, m.num_heads)
    return _softmax_row_maps(q, k, q.shape[-1] ** -0.5, call)


def _argmax_clusters(attn: Tensor, call: _Call) -> Tensor:
    """``(B, H, m, N)`` extraction rows -> ``(B, H, 1, h, w)`` label of the row that
    extracts each patch most."""
    return _patches(attn.argmax(2, keepdim=True), call)


def _cbsa_maps(call: _Call) -> Dict[str, Tensor]:
    """CBSA: ``A`` ``(B, H, m, N)``; token-to-token ``AᵀA``, query row
    ``Σ_r A[r, q] A[r, n]``; representatives' rows; clusters ``argmax_r A[r, n]``."""
    attn = _own_maps(call).get('attention')
    if attn is None:
        return {}
    row = _query_weights(attn, call).transpose(-2, -1) @ attn  # (B, H, 1, N)
    return {call.query: _patches(row, call), 'reps': _patches(attn, call),
            'clusters': _argmax_clusters(attn, call)}


def _adapted_maps(raw: Dict[str, Tensor], call: _Call) -> Dict[str, Tensor]:
    """The adapted attention of docs/mechanisms.md §8 from the ``attention_maps`` of
    ``AdaptedCBSA`` or an adapted ViT's core: ``A = raw['attention']`` ``(B, H, m, N)``,
    ``Bc = raw['broadcast']`` ``(B, H, N, m)``; token-to-token ``Bc A``, query row; the
    representatives' rows; clusters ``argmax_r A[r, n]``."""
    attn, bcast = raw.get('attention'), raw.get('broadcast')
    if attn is None or bcast is None:
        return {}
    weights = _query_weights(bcast.transpose(-2, -1), call).transpose(-2, -1)  # (B,H,1,m)
    return {call.query: _patches(weights @ attn, call), 'reps': _patches(attn, call),
            'clusters': _argmax_clusters(attn, call)}


def _adapted_cbsa_maps(call: _Call) -> Dict[str, Tensor]:
    """AdaptedCBSA, and the adapted core of mmseg's ViT (``AdaptedInProjAttention``)."""
    return _adapted_maps(_own_maps(call), call)


def _adapted_core(module: nn.Module) -> Optional[nn.Module]:
    """The adapted core of an mmpretrain ``MultiheadAttention`` whose
    ``scaled_dot_product_attention`` was exchanged by ``AdaptedVisionTransformer``."""
    core = getattr(module, 'scaled_dot_product_attention', None)
    return core if isinstance(core, nn.Module) and hasattr(core, 'attention_maps') else None


def _tssa_maps(call: _Call) -> Dict[str, Tensor]:
    """TSSA: ``π`` ``(B, H, N)`` -> per-head soft groups and the hard partition."""
    pi = _own_maps(call).get('assignment')
    if pi is None:
        return {}
    groups = _patches(pi.unsqueeze(2), call)  # (B, H, 1, h, w)
    return {'groups': groups, 'clusters': groups.argmax(1, keepdim=True)}


def _mita_maps(call: _Call) -> Dict[str, Tensor]:
    """MiTA: ``expert`` ``(B, H, N)`` long, ``routed_keys`` ``(B, H, M, k')`` long token
    indices -> expert of each patch, indicator of each expert's keys."""
    raw = _own_maps(call)
    expert, keys = raw.get('expert'), raw.get('routed_keys')
    if expert is None:
        return {}
    out = {'clusters': _patches(expert.unsqueeze(2), call)}
    if keys is not None:
        b, h, num_experts, _ = keys.shape
        onehot = torch.zeros(b, h, num_experts, expert.shape[-1], device=keys.device)
        onehot.scatter_(-1, keys, 1.0)
        out['routed_keys'] = _patches(onehot, call)
    return out


# The one table: attention class -> what is captured. Keys are class names for mmcbsa's
# modules and ``module.qualname`` for other libraries' (several are "MultiheadAttention").
MECHANISMS: Dict[str, Mechanism] = {
    'CBSA': Mechanism(_input_linear('in_proj'), _cbsa_maps),
    'AdaptedCBSA': Mechanism(_child_part('qkv', 2, 3), _adapted_cbsa_maps, ('qkv', )),
    'MSSA': Mechanism(_child_output('in_proj'), _softmax_maps, ('in_proj', )),
    'MHSA': Mechanism(_child_part('qkv', 2, 3), _softmax_maps, ('qkv', )),
    'TSSA': Mechanism(_child_output('in_proj'), _tssa_maps, ('in_proj', )),
    'MiTA': Mechanism(_mita_value, _mita_maps),
    'PrimalAttention': Mechanism(_child_part('qk', 0, 2), None, ('qk', )),
    'mmpretrain.models.utils.attention.MultiheadAttention':
        Mechanism(_child_part('qkv', 2, 3), _qkv_maps('qkv'), ('qkv', )),
    'torch.nn.modules.activation.MultiheadAttention':
        Mechanism(_torch_mha_value, _torch_mha_maps),
    # AdaptedVisionTransformer (mmseg) puts this in place of nn.MultiheadAttention; the
    # mmpretrain one keeps its MultiheadAttention (entry above, whose maps read the core)
    'AdaptedInProjAttention': Mechanism(_torch_mha_value, _adapted_cbsa_maps),
}
_ISTA_TYPES = ('ISTA', )
# Modules whose attentions see the patch tokens FIRST and their extra tokens after them
# (mmcbsa and the ViTs put CLS / class tokens first): mmseg's Segmenter mask transformer.
SUFFIX_LAYOUT_MODULES = ('SegmenterMaskTransformerHead', )


def mechanism_of(module: nn.Module) -> Optional[Mechanism]:
    """The :data:`MECHANISMS` entry of ``module``'s class (qualified name first)."""
    cls = type(module)
    return MECHANISMS.get(f'{cls.__module__}.{cls.__qualname__}',
                          MECHANISMS.get(cls.__name__))


class AttentionCapture:
    """Context manager: capture projections, maps and ISTA outputs of ``model``.

    Example::

        with AttentionCapture(model) as cap:
            model(inputs, mode='tensor')
        for rec in cap.layers:
            print(rec.name, rec.projection.shape, list(rec.maps))

    Args:
        model: any ``nn.Module`` (mmseg segmentor, mmpretrain classifier, a bare backbone).
        projections: keep each attention's input projection.
        maps: compute the maps (each attention's maps once more after its call: the
            explicit ``N × N`` softmax in MSSA / MHSA / ViT layers, CBSA's plain-op path).
        ista: keep the output of every ISTA module.
        query: which row the token-to-token maps show: ``'cls'`` (token 0), ``'mean'``
            (mean over patch queries) or ``'auto'`` (``'cls'`` when the layer has exactly
            one prefix token, else ``'mean'``).

    Attributes:
        layers: :class:`LayerRecord` per attention call, in call order.
        ista: :class:`TensorRecord` per ISTA call, in call order.
    """

    def __init__(self, model: nn.Module, projections: bool = True, maps: bool = True,
                 ista: bool = True, query: str = 'auto') -> None:
        if query not in QUERY_MODES:
            raise ValueError(f'AttentionCapture: query must be one of {QUERY_MODES}, '
                             f'got {query!r}')
        self.model = model
        self.want_projections, self.want_maps, self.want_ista = projections, maps, ista
        self.query = query
        self.layers: List[LayerRecord] = []
        self.ista: List[TensorRecord] = []
        self._handles: list = []
        self._active: Dict[int, List[_Call]] = {}
        self._last_grid: Optional[Grid] = None
        self._suffix_layout: set = set()

    # public ---------------------------------------------------------------------------
    def clear(self) -> None:
        """Forget what was captured so far (hooks stay attached)."""
        self.layers, self.ista = [], []

    def __enter__(self) -> 'AttentionCapture':
        names = {id(m): n for n, m in self.model.named_modules()}
        for owner in self.model.modules():
            if type(owner).__name__ in SUFFIX_LAYOUT_MODULES:
                self._suffix_layout.update(id(m) for m in owner.modules())
        for module in self.model.modules():
            name = names[id(module)]
            mech = mechanism_of(module)
            if mech is not None:
                self._attach(module, name, mech)
            elif type(module).__name__ in _ISTA_TYPES and self.want_ista:
                self._handles.append(module.register_forward_hook(
                    self._ista_hook(name)))
            elif type(module).__name__.endswith(('PatchEmbed', 'ConvStem')):
                self._handles.append(module.register_forward_hook(self._grid_hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._active = {}

    # hooks ----------------------------------------------------------------------------
    def _attach(self, module: nn.Module, name: str, mech: Mechanism) -> None:
        self._handles.append(module.register_forward_pre_hook(self._pre_hook,
                                                              with_kwargs=True))
        self._handles.append(module.register_forward_hook(
            self._post_hook(name, mech), with_kwargs=True))
        for child in mech.children:
            sub = getattr(module, child, None)
            if isinstance(sub, nn.Module):
                self._handles.append(sub.register_forward_hook(self._child_hook(module, child)))

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._active.setdefault(id(module), []).append(_Call(module, args, kwargs))

    def _child_hook(self, parent: nn.Module, child: str):

        def hook(module, args, output):
            calls = self._active.get(id(parent))
            if calls and child not in calls[-1].children:
                calls[-1].children[child] = output.detach()

        return hook

    def _grid_hook(self, module, args, output) -> None:
        if isinstance(output, tuple) and len(output) == 2:
            grid = _as_grid(output[1])
            if grid is not None:
                self._last_grid = grid

    def _ista_hook(self, name: str):

        def hook(module, args, output):
            self.ista.append(TensorRecord(name, type(module).__name__, output.detach()))

        return hook

    def _post_hook(self, name: str, mech: Mechanism):

        def hook(module, args, kwargs, output):
            call = self._active[id(module)].pop()
            x = call.arg(0, 'x') if 'query' not in call.kwargs else call.kwargs['query']
            if not isinstance(x, Tensor):
                x = args[0]
            batch_first = getattr(module, 'batch_first', True)
            num_tokens = int(x.shape[1] if batch_first else x.shape[0])
            self._locate(call, num_tokens)
            record = LayerRecord(name=name, type=type(module).__name__,
                                 num_heads=int(module.num_heads), num_tokens=num_tokens,
                                 hw_shape=call.hw_shape, num_prefix=call.num_prefix)
            with torch.no_grad():
                if self.want_projections and mech.projection is not None:
                    proj = mech.projection(call)
                    record.projection = None if proj is None else proj.detach()
                if self.want_maps and mech.maps is not None and call.hw_shape is not None:
                    record.query = call.query
                    record.maps = {k: v.detach() for k, v in mech.maps(call).items()}
            self.layers.append(record)

        return hook

    def _locate(self, call: _Call, num_tokens: int) -> None:
        """Patch grid and prefix count of a call: the ``hw_shape`` it was given, else the
        last patch embedding's grid, else a square guess."""
        candidates = [_as_grid(call.kwargs.get('hw_shape')),
                      _as_grid(call.args[1]) if len(call.args) > 1 else None,
                      self._last_grid]
        grid = next((g for g in candidates if g is not None and g[0] * g[1] <= num_tokens),
                    None)
        if grid is None:
            for prefix in (1, 0):
                side = math.isqrt(max(num_tokens - prefix, 0))
                if side > 0 and side * side == num_tokens - prefix:
                    grid = (side, side)
                    break
        if grid is None:
            return
        call.hw_shape, call.num_prefix = grid, num_tokens - grid[0] * grid[1]
        suffix = id(call.module) in self._suffix_layout
        call.patch_start = 0 if suffix else call.num_prefix
        if self.query == 'auto':
            call.query = 'cls' if call.num_prefix == 1 and not suffix else 'mean'
        else:
            call.query = self.query
        if call.query == 'cls' and (call.num_prefix == 0 or suffix):
            call.query = 'mean'  # no leading non-patch token to read a row from
