"""Contract-and-Broadcast Self-Attention (CBSA, NeurIPS 2025; docs/mechanisms.md §1).

Implementation notes (performance, exact math):

* Everything between the two projections runs in a *channels-first* layout
  ``wᵀ ∈ R^{(B·H)×p×N}`` that is contiguous per head, so every product involving
  the ``N`` tokens is one plain batched GEMM (``torch.bmm``) without any
  transposed copies, for any batch size.
* Pooling of the representatives is ``adaptive_avg_pool2d`` straight on that layout
  (each channel's patch tokens already form a row-major ``h × w`` image).
* Extract / contract / broadcast is one :class:`torch.autograd.Function` with a
  hand-written backward: 3 token-sized GEMMs forward, 6 backward, the pooling
  gradient added in place into the token gradient, no ``N×N`` or ``N×Hp``
  temporaries besides the inputs' own gradients.
* Under autocast the core runs in the autocast dtype with softmax statistics in
  float32.
* On CUDA (``path='auto'``, eager) the core is :mod:`mmcbsa.ops.cbsa_triton`: three
  Triton kernels forward and three backward that never store the ``m × N`` map,
  token-major ``(B, N, H·p)`` from projection to projection; the PyTorch path is the
  reference, the CPU path and what ``torch.compile`` traces (inductor fuses it).
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor

from mmcbsa.ops import cbsa_triton
from mmcbsa.registry import register_model
from .base import (GridLike, adaptive_avg_pool2d_any, check_hw_shape, check_input_width,
                   compute_dtype, is_compiling, is_exporting, patch_span,
                   pool_grid_channels_last, resolve_head_dims, softmax_backward, softmax_fp32,
                   to_grid, warn_once)

PATHS = ('auto', 'triton', 'torch')


def _linear_channels_first(x: Tensor, weight: Tensor) -> Tensor:
    """``x (B, N, C)``, ``weight (O, C)`` -> ``weight xᵀ`` ``(B, O, N)`` contiguous."""
    return torch.bmm(weight.expand(x.shape[0], -1, -1), x.transpose(1, 2))


def _linear_channels_last(t: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``t (B, I, N)``, ``weight (C, I)`` -> ``tᵀ weightᵀ + bias`` ``(B, N, C)`` contiguous."""
    y = torch.bmm(t.transpose(1, 2), weight.t().expand(t.shape[0], -1, -1))
    return y if bias is None else y.add_(bias)


def _contract_broadcast(w_t: Tensor, r0_t: Tensor, a_rep: Tensor, a_x: Tensor,
                        scale: float) -> Tuple[Tensor, ...]:
    """docs/mechanisms.md §1.3–1.5 on channels-first heads ``w_t (G, p, N)``, ``r0_t (G, p, m)``,
    step sizes ``(G, 1, 1)``. Returns ``o_t (G, p, N)`` and the intermediates the
    backward needs: ``A (G, m, N)``, ``(A w)ᵀ``, ``Rᵀ``, ``Q (G, m, m)``, ``Δᵀ``."""
    # §1.3 extract: A = softmax_tokens(R0 wᵀ / √p);  Rᵀ = R0ᵀ + α_rep (A w)ᵀ
    attn = softmax_fp32(torch.bmm(r0_t.transpose(1, 2) * scale, w_t))
    aw_t = torch.bmm(w_t, attn.transpose(1, 2))  # (G, p, m)
    reps_t = torch.addcmul(r0_t, a_rep, aw_t)
    # §1.4 contract: Δ = softmax(R Rᵀ / √p) R  ->  Δᵀ = Rᵀ Qᵀ   (m × m, cheap)
    q = softmax_fp32(torch.bmm(reps_t.transpose(1, 2), reps_t) * scale)
    delta_t = torch.bmm(reps_t, q.transpose(1, 2))  # (G, p, m)
    # §1.5 broadcast: oᵀ = (α_x Δ)ᵀ A
    out_t = torch.bmm(delta_t * a_x, attn)
    return out_t, attn, aw_t, reps_t, q, delta_t


def _per_group(step: Tensor, groups: int) -> Tensor:
    """``(H,)`` per-head scalars -> ``(G, 1, 1)`` for ``G = B·H`` (index ``b·H + h``)."""
    heads = step.numel()
    return step.view(1, heads).expand(groups // heads, heads).reshape(groups, 1, 1)


class _ChannelsFirstLinear(torch.autograd.Function):
    """:func:`_linear_channels_first` with a backward that returns a contiguous
    ``(B, N, C)`` input gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return _linear_channels_first(x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        b = x.shape[0]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad.transpose(1, 2), weight.expand(b, -1, -1))  # (B, N, C)
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(grad, x).sum(0)  # (O, C)
        return grad_x, grad_w


class _ChannelsLastLinear(torch.autograd.Function):
    """:func:`_linear_channels_last` with a backward that returns a contiguous
    channels-first ``(B, I, N)`` gradient."""

    @staticmethod
    def forward(ctx, t: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(t, weight)
        ctx.has_bias = bias is not None
        return _linear_channels_last(t, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        t, weight = ctx.saved_tensors
        grad_t = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_t = torch.bmm(weight.t().expand(t.shape[0], -1, -1),
                               grad.transpose(1, 2))  # (B, I, N)
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(t, grad).sum(0).t()  # (C, I)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 1))
        return grad_t, grad_w, grad_b


class _GridPool:
    """Adaptive average pooling (``F.adaptive_avg_pool2d``) of the tokens
    ``[start, start + h·w)`` of a channels-first ``(G, p, N)`` tensor onto an
    ``s_h × s_w`` grid -> ``(G, p, m)``; the patch tokens of each channel are already
    a row-major ``h × w`` image in this layout, so nothing is copied or transposed.
    """

    def __init__(self, start: int, hw: Tuple[int, int], grid: Tuple[int, int]) -> None:
        self.start, (self.h, self.w), self.grid = start, hw, grid

    def _patches(self, t: Tensor) -> Tensor:
        g, p, _ = t.shape
        return t[:, :, self.start:self.start + self.h * self.w].reshape(
            g * p, self.h, self.w)

    def __call__(self, w_t: Tensor) -> Tensor:
        g, p, _ = w_t.shape
        return adaptive_avg_pool2d_any(self._patches(w_t), self.grid).view(g, p, -1)

    def token_major(self, w: Tensor) -> Tensor:
        """The same pooling of token-major ``w (B, N, C)`` -> ``(B, m, C)`` (plain
        autograd)."""
        patches = w[:, self.start:self.start + self.h * self.w].unflatten(1, (self.h, self.w))
        return pool_grid_channels_last(patches, self.grid).flatten(1, 2)

    def backward_into(self, grad_w_t: Tensor, grad_r0_t: Tensor) -> None:
        """``grad_w_t[..., patches] += pooling-gradient(grad_r0_t)`` in place."""
        patches = self._patches(grad_w_t)
        grad = torch.ops.aten._adaptive_avg_pool2d_backward(
            grad_r0_t.reshape(patches.shape[0], *self.grid), patches)
        patches.add_(grad)


class _ContractBroadcast(torch.autograd.Function):
    """docs/mechanisms.md §1.3–1.5 on channels-first heads, hand-written backward.

    Inputs: ``w_t (G, p, N)`` contiguous (``G = B·H``, index ``b·H + h``), ``r0_t``
    ``(G, p, m)`` or ``None`` (then ``pool(w_t)``), ``step_rep``/``step_x`` ``(H,)``.
    Output ``o_t = (α_x Δ)ᵀ A`` ``(G, p, N)``.
    """

    @staticmethod
    def forward(ctx, w_t: Tensor, r0_t: Optional[Tensor], step_rep: Tensor,
                step_x: Tensor, pool: Optional[_GridPool], scale: float) -> Tensor:
        g, heads = w_t.shape[0], step_rep.numel()
        a_rep, a_x = _per_group(step_rep, g), _per_group(step_x, g)
        if r0_t is None:
            r0_t = pool(w_t)
        out_t, attn, aw_t, reps_t, q, delta_t = _contract_broadcast(w_t, r0_t, a_rep, a_x,
                                                                    scale)
        ctx.save_for_backward(w_t, r0_t, attn, aw_t, reps_t, q, delta_t, a_rep, a_x)
        ctx.pool, ctx.scale, ctx.heads = pool, scale, heads
        return out_t

    @staticmethod
    def backward(ctx, grad_out_t: Tensor):
        w_t, r0_t, attn, aw_t, reps_t, q, delta_t, a_rep, a_x = ctx.saved_tensors
        scale, heads = ctx.scale, ctx.heads
        # broadcast: o_t = (α_x Δᵀ) A
        grad_dx_t = torch.bmm(grad_out_t, attn.transpose(1, 2))  # d(α_x Δᵀ)  (G, p, m)
        grad_attn = torch.bmm((delta_t * a_x).transpose(1, 2), grad_out_t)  # (G, m, N)
        grad_step_x = (grad_dx_t * delta_t).sum((1, 2))
        grad_delta_t = grad_dx_t * a_x
        # contract: Δ = Q R, Q = softmax(scale · R Rᵀ)
        grad_q = torch.bmm(grad_delta_t.transpose(1, 2), reps_t)  # (G, m, m)
        grad_reps_t = torch.bmm(grad_delta_t, q)  # (G, p, m)
        grad_logits = softmax_backward(grad_q, q) * scale
        grad_reps_t = torch.baddbmm(grad_reps_t, reps_t,
                                    grad_logits + grad_logits.transpose(1, 2))
        # Rᵀ = R0ᵀ + α_rep (A w)ᵀ
        grad_step_rep = (grad_reps_t * aw_t).sum((1, 2))
        grad_aw_t = grad_reps_t * a_rep
        grad_w_t = torch.bmm(grad_aw_t, attn)  # (G, p, N)
        grad_attn.baddbmm_(grad_aw_t.transpose(1, 2), w_t)
        # extract: A = softmax(scale · R0 wᵀ)
        grad_s = softmax_backward(grad_attn, attn)
        grad_r0_t = torch.baddbmm(grad_reps_t, w_t, grad_s.transpose(1, 2), alpha=scale)
        grad_w_t.baddbmm_(r0_t, grad_s, alpha=scale)
        if ctx.pool is not None:
            ctx.pool.backward_into(grad_w_t, grad_r0_t)
            grad_r0_t = None
        b = grad_w_t.shape[0] // heads
        return (grad_w_t, grad_r0_t, grad_step_rep.view(b, heads).sum(0),
                grad_step_x.view(b, heads).sum(0), None, None)


@register_model()
class CBSA(BaseModule):
    """CBSA: contract ``m`` representatives, broadcast the update to all tokens.

    With ``w = x Uᵀ`` split into ``H`` heads of width ``p`` (docs/mechanisms.md §1):

    1. ``R0``: representatives, ``(B, H, m, p)`` — adaptive average pooling of the
       *patch* tokens of ``w`` onto an ``s_h × s_w`` grid (``rep_mode='pool'``), or
       learned parameters (``rep_mode='learned'``);
    2. extract: ``A = softmax_tokens(R0 wᵀ / √p)`` ``(B, H, m, N)`` and
       ``R = R0 + α_rep · A w``;
    3. contract: ``Δ = softmax(R Rᵀ / √p) R`` ``(B, H, m, p)``;
    4. broadcast: ``o = α_x · Aᵀ Δ`` ``(B, H, N, p)``;
    5. ``y = Linear_{Hp→C}(concat_h o)``.

    Cost is linear in ``N`` for a fixed ``m``. Extraction and broadcast cover all
    tokens (prefix tokens included); only the pooling looks at the patch grid.

    Args:
        embed_dims: token width ``C``.
        num_heads: heads ``H``.
        head_dims: head width ``p``; default ``C / H``.
        num_reps: number of representatives ``m`` (a perfect square, pooled on a
            square grid) or an explicit grid ``(s_h, s_w)``. Default 64 (8×8).
        rep_mode: ``'pool'`` (default) or ``'learned'``.
        legacy_pooling: pool like the reference implementation (first ``N−1``
            tokens on a ``⌊√N⌋`` square; needed for released checkpoints).
        proj_bias: bias of the output projection.
        proj_drop: dropout on the output.
        path: ``'auto'`` (default): the Triton kernels of :mod:`mmcbsa.ops.cbsa_triton`
            for CUDA inputs computed in float32/bfloat16/float16 with ``m, p <= 128``,
            in eager mode; the PyTorch path otherwise (CPU, float64, tracing,
            ``torch.compile``). ``'triton'`` forces the kernels
            (an error gives the reason where they cannot run; CPU inputs need Triton's
            interpreter, ``TRITON_INTERPRET=1``: for tests). ``'torch'``: the PyTorch
            path. A speed choice: the result does not depend on it (float rounding).
        fused: on the PyTorch path, train through the hand-written backward
            (``True``, default; docs/benchmark_attention.md) or let autograd
            differentiate the plain operations (``False``: the reference the tests compare
            the hand-written backward with). Tracing, scripting, exporting and inference
            without gradients always run the plain operations.

    Maps (analysis, ``mmcbsa.analysis``): :meth:`attention_maps` takes the arguments of
    :meth:`forward` and returns ``{'attention': A}`` ``(B, H, m, N)``, the extraction
    weights of step 2.

    Shapes: ``x (B, N, C)``, ``hw_shape=(h, w)`` with ``h*w <= N`` -> ``(B, N, C)``.
    """

    def __init__(self, embed_dims: int, num_heads: int, head_dims: Optional[int] = None,
                 num_reps: GridLike = 64, rep_mode: str = 'pool', legacy_pooling: bool = False,
                 proj_bias: bool = True, proj_drop: float = 0., path: str = 'auto',
                 fused: bool = True, init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.head_dims = resolve_head_dims(embed_dims, num_heads, head_dims, 'CBSA')
        self.fused = bool(fused)
        if path not in PATHS:
            raise ValueError(f'CBSA: path must be one of {PATHS}, got {path!r}')
        self.path = path
        self.rep_grid = to_grid(num_reps, 'num_reps', 'CBSA')
        if rep_mode not in ('pool', 'learned'):
            raise ValueError(f"CBSA: rep_mode must be 'pool' or 'learned', got {rep_mode!r}")
        if legacy_pooling and rep_mode != 'pool':
            raise ValueError("CBSA: legacy_pooling=True requires rep_mode='pool'")
        self.embed_dims, self.num_heads = embed_dims, num_heads
        self.num_reps = self.rep_grid[0] * self.rep_grid[1]
        self.rep_mode, self.legacy_pooling = rep_mode, legacy_pooling
        inner = num_heads * self.head_dims
        self.in_proj = nn.Linear(embed_dims, inner, bias=False)  # U
        self.step_rep = nn.Parameter(torch.randn(num_heads))  # α_rep
        self.step_x = nn.Parameter(torch.randn(num_heads))  # α_x
        if rep_mode == 'learned':
            self.reps = nn.Parameter(torch.empty(self.num_reps, inner))  # R0 (m, Hp)
            nn.init.trunc_normal_(self.reps, std=0.02)
        self.out_proj = nn.Linear(inner, embed_dims, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _pooler(self, x: Tensor, hw_shape: Optional[Sequence[int]]) -> _GridPool:
        """Which tokens are pooled, on which grid (docs/mechanisms.md §1.2 and its legacy form)."""
        start, h, w = patch_span(x.shape[1], hw_shape, self.legacy_pooling, 'CBSA')
        return _GridPool(start, (h, w), self.rep_grid)

    def _warn_if_superlinear(self, h: int, w: int) -> None:
        """Warn once per (m, h, w) when there are more representatives than patch
        tokens: ``m > h·w`` still computes, but the ``m²`` contraction then dominates
        and the cost is no longer linear in the number of tokens (docs/mechanisms.md §1)."""
        m = self.num_reps
        if m > h * w:
            s_h, s_w = self.rep_grid
            warn_once(f'CBSA-num_reps-{s_h}x{s_w}-{h}x{w}',
                      f'CBSA: {m} representatives (num_reps grid {s_h}x{s_w}) for only '
                      f'{h * w} patch tokens ({h}x{w} grid): more representatives than '
                      f'patches, so the cost is no longer linear in the tokens; use '
                      f'num_reps <= {h * w} or larger inputs')

    def use_triton(self, x: Tensor, dtype: torch.dtype) -> bool:
        """Whether this forward runs the Triton core (see ``path``)."""
        if self.path == 'torch' or (self.path == 'auto' and x.device.type != 'cuda'):
            return False
        why = cbsa_triton.supported(self.num_reps, self.head_dims, dtype, x.device)
        if why is None and (torch.jit.is_tracing() or torch.jit.is_scripting()
                            or is_compiling()):
            why = 'eager execution (not traced, scripted or compiled)'
        if why is not None and self.path == 'triton':
            raise ValueError(f"CBSA: path='triton' needs {why}; use path='auto'")
        return why is None

    def forward(self, x: Tensor, hw_shape: Optional[Sequence[int]] = None) -> Tensor:
        check_input_width(x, self.embed_dims, 'CBSA')
        b, n, _ = x.shape
        heads, p = self.num_heads, self.head_dims
        dtype = compute_dtype(x)
        pool = None
        if self.rep_mode == 'pool':
            pool = self._pooler(x, hw_shape)
            self._warn_if_superlinear(pool.h, pool.w)
        elif hw_shape is not None:
            self._warn_if_superlinear(*check_hw_shape(x, hw_shape, 'CBSA'))
        if self.use_triton(x, dtype):
            return self.proj_drop(self._forward_triton(x, pool, dtype))
        # Hand-written backward when training eagerly; the same math as plain ops when
        # tracing / scripting (FLOP counters, export) or without autograd.
        fused = (self.fused and torch.is_grad_enabled() and not torch.jit.is_tracing()
                 and not torch.jit.is_scripting() and not is_exporting())
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, u = x.to(dtype), self.in_proj.weight.to(dtype)
            w_out = self.out_proj.weight.to(dtype)
            bias = None if self.out_proj.bias is None else self.out_proj.bias.to(dtype)
            if fused:
                # w = x Uᵀ, channels first: (B, Hp, N) -> heads (B·H, p, N)
                w_t = _ChannelsFirstLinear.apply(x, u).view(b * heads, p, n)
                out_t = _ContractBroadcast.apply(w_t, self._learned_reps_t(b, dtype),
                                                 self.step_rep.to(dtype),
                                                 self.step_x.to(dtype), pool, p**-0.5)
                y = _ChannelsLastLinear.apply(out_t.view(b, heads * p, n), w_out, bias)
            else:
                out_t = self._plain_core(x, pool, dtype)[0]
                y = _linear_channels_last(out_t.view(b, heads * p, n), w_out, bias)
        return self.proj_drop(y)

    def _learned_reps_t(self, batch: int, dtype: torch.dtype) -> Optional[Tensor]:
        """Learned representatives ``(m, H·p)`` as ``(B·H, p, m)``; ``None`` when pooled."""
        if self.rep_mode != 'learned':
            return None
        heads, p = self.num_heads, self.head_dims
        return self.reps.to(dtype).t().reshape(1, heads, p, -1).expand(
            batch, -1, -1, -1).reshape(batch * heads, p, -1)

    def _plain_core(self, x: Tensor, pool: Optional[_GridPool],
                    dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """Steps 1–4 as plain PyTorch operations on ``x`` (already in ``dtype``):
        ``o`` channels first ``(B·H, p, N)`` and ``A`` ``(B·H, m, N)``."""
        b, n, _ = x.shape
        heads, p = self.num_heads, self.head_dims
        g = b * heads
        w_t = _linear_channels_first(x, self.in_proj.weight.to(dtype)).view(g, p, n)
        r0_t = self._learned_reps_t(b, dtype)
        return _contract_broadcast(w_t, pool(w_t) if r0_t is None else r0_t,
                                   _per_group(self.step_rep.to(dtype), g),
                                   _per_group(self.step_x.to(dtype), g), p**-0.5)[:2]

    @torch.no_grad()
    def attention_maps(self, x: Tensor,
                       hw_shape: Optional[Sequence[int]] = None) -> Dict[str, Tensor]:
        """``{'attention': A (B, H, m, N)}`` of ``forward(x, hw_shape)`` (PyTorch path)."""
        check_input_width(x, self.embed_dims, 'CBSA')
        pool = self._pooler(x, hw_shape) if self.rep_mode == 'pool' else None
        dtype = compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            attn = self._plain_core(x.to(dtype), pool, dtype)[1]
        return {'attention': attn.view(x.shape[0], self.num_heads, -1, x.shape[1])}

    def _forward_triton(self, x: Tensor, pool: Optional[_GridPool], dtype: torch.dtype) -> Tensor:
        """§1 with the core in :func:`mmcbsa.ops.cbsa_triton.contract_broadcast`,
        token-major ``(B, N, H·p)`` throughout."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            w = F.linear(x.to(dtype), self.in_proj.weight.to(dtype))  # (B, N, H·p)
            if pool is None:  # learned (m, H·p), shared by the batch
                r0 = self.reps.to(dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            else:
                r0 = pool.token_major(w)  # (B, m, H·p)
            out = cbsa_triton.contract_broadcast(w, r0, self.step_rep, self.step_x,
                                                 self.num_heads, self.head_dims ** -0.5)
            bias = None if self.out_proj.bias is None else self.out_proj.bias.to(dtype)
            return F.linear(out, self.out_proj.weight.to(dtype), bias)
