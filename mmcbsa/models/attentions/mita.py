"""MiTA — Mixture-of-Top-k Attention (arXiv 2602.01219; docs/mechanisms.md §5, §5b).

Exact: the reference runs through CUDA flash-attn varlen kernels and merges two
partial attentions by log-sum-exp; here both parts are one softmax. Four exact
execution paths compute the same function (chosen by ``path``):

* **kernel** (CPU, float32/float64, any ``N``; the automatic choice there): the
  compiled C kernel of :mod:`mmcbsa.ops.mita_cpu` computes, per ``(batch, head)``,
  only the ``M + k'`` open logits of each query (landmark pooling, routing, shared
  expert, one softmax, values; and the backward) — ``O(N·(M + k')·p)`` work at every
  ``N``. The projections stay PyTorch GEMMs. Under ``torch.compile`` it is one custom
  op (no graph break). It is the only path that is faster than SDPA's fused softmax
  attention at MiTA-DeiT's 197 tokens (numbers in the class docstring).
* **masked** (every CUDA input; the automatic choice there): one SDPA call over a key
  table with a boolean mask that opens each query's landmark keys and its expert's
  routed keys (:func:`_masked_core`); no host synchronisation, no loop over samples or
  experts, no data-dependent shape (one ``torch.compile`` graph, CUDA-graph friendly).
  ``O(N·(M + min(N, M·k'))·p)`` work: not faster than softmax attention at
  ``N = 1024`` on a GPU (docs/benchmark_attention.md, "CUDA").
* **dense** (small ``N``, any device): every query's logits against all ``N`` keys are one
  batched GEMM; the ``k`` routed logits of each query are *gathered* from it, and
  the softmax weights are scattered back into an ``N × N`` matrix for the value
  product. No data-dependent shapes (``torch.compile`` traces it without graph
  breaks); ``O(N²)`` memory per head, like softmax attention, so it is only used
  for small ``N``. It runs sample by sample on ``q, k, v`` read as strided views
  of the input projection (no head split or merge copies; one sample's
  ``H × N × N`` buffer stays in cache). Training runs through a hand-written
  backward (:class:`_DenseMiTA`: 2 token-pair GEMMs forward, 4 backward) that
  writes the gradients straight into the projection's layout.
* **grouped** (large ``N``, any device): every query routed to expert ``m`` sees the *same*
  ``k`` routed keys ``I_m``, so queries are sorted by expert and cut into blocks of
  ``query_block_size`` queries that share one expert (the last block of an expert
  is padded). Each block attends, in one softmax, to its key table (the ``M``
  landmark keys and the expert's ``k`` gathered keys; only the latter in
  ``'routed'`` mode): one batched SDPA over ``(#blocks, T, M + k)`` (chunked over
  blocks); outputs are moved back to token order. Peak memory
  ``O(N·(M + p) + (N/T + M)·(M + k)·p)`` per head, never ``O(N²)``; the block
  size changes nothing but speed. The number of blocks depends on the routing
  (a data-dependent shape).

Layout (PyTorch paths): token-major throughout (rows of ``p`` values per token and head, as the
projections produce them). The previous channels-first layout ``(B·H, p, N)``
transposed ``q, k, v`` and their gradients element by element (19 ``copy_``
calls, 11–14 % of a training step at ``N = 197``); against it, fwd+bwd at
``N = 197`` (C=384, H=6, batch 8, 1 thread, CPU time, median of 21 interleaved
repeats, load ≈ 2.3 on 2 cores) takes 0.89× the time on the dense path (1.35×
instead of 1.52× ``MHSA``) and 0.96× on the grouped one. Landmarks are pooled from a
channels-last copy of the patch tokens (:class:`_TokenPool`).
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor

from mmcbsa.ops import mita_cpu
from mmcbsa.registry import register_model
from .base import (GridLike, check_hw_shape, check_input_width, check_positive,
                   resolve_head_dims, to_grid, warn_once)
from .cbsa import _compute_dtype, _softmax, _softmax_backward

MODES = ('mixture', 'routed')
PATHS = ('auto', 'kernel', 'masked', 'dense', 'grouped')


# ----------------------------------------------------------------------------- layout
def _split_heads(y: Tensor, parts: int, heads: int, merged: Tuple[int, ...] = (),
                 split: int = 3) -> Tuple[Tensor, ...]:
    """``y (B, N, parts·C')`` (an input projection) -> its first ``split`` chunks as
    heads, each ``(B·H, N, p)`` contiguous (token-major: the copy moves rows of ``p``
    values), then the chunks listed in ``merged`` as ``(B, N, C')`` views."""
    b, n, width = y.shape
    c = width // parts
    p = c // heads
    split = y.view(b, n, parts, heads, p)[:, :, :split].permute(2, 0, 3, 1, 4).reshape(
        split, b * heads, n, p).unbind(0)
    return tuple(split) + tuple(y[:, :, i * c:(i + 1) * c] for i in merged)


class _SplitHeads(torch.autograd.Function):
    """:func:`_split_heads` whose ``merged`` chunks are contiguous copies, with a
    backward that writes every chunk's gradient straight into the ``(B, N, parts·C')``
    layout of the projection (one pass; a head chunk and a merged copy of the same
    chunk add up), instead of autograd's zero-filled buffer per output."""

    @staticmethod
    def forward(ctx, y: Tensor, parts: int, heads: int, merged: Tuple[int, ...]):
        ctx.shape, ctx.parts, ctx.heads, ctx.merged = y.shape, parts, heads, merged
        out = _split_heads(y, parts, heads, merged)
        return out[:3] + tuple(t.contiguous() for t in out[3:])

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        b, n, width = ctx.shape
        parts, heads = ctx.parts, ctx.heads
        c = width // parts
        p = c // heads
        ref = next(g for g in grads if g is not None)
        grad_y = ref.new_empty(b, n, parts, heads, p)
        for i in range(parts):
            dst = grad_y[:, :, i]
            head = grads[i] if i < 3 else None
            if head is not None:
                dst.copy_(head.view(b, heads, n, p).transpose(1, 2))
            for j, extra in zip(ctx.merged, grads[3:]):
                if j == i and extra is not None:
                    if head is None:
                        dst.copy_(extra.view(b, n, heads, p))
                        head = extra
                    else:
                        dst.add_(extra.view(b, n, heads, p))
            if head is None:
                dst.zero_()
        return grad_y.view(b, n, width), None, None, None


class _TokenPool:
    """Adaptive average pooling (``F.adaptive_avg_pool2d``) of the tokens
    ``[start, start + h·w)`` of a token-major ``(G, N, p)`` tensor onto an ``s_h × s_w``
    grid -> ``(G, M, p)``. The patch tokens are copied (rows of ``p`` values) into a
    channels-last ``(G, p, h, w)`` image, the layout the pooling kernel reads fastest
    (at N = 4097, H = 6: 1.5 ms, against 4.0 ms from the strided view, which the kernel
    transposes element by element)."""

    def __init__(self, start: int, hw: Tuple[int, int], grid: Tuple[int, int]) -> None:
        self.start, (self.h, self.w), self.grid = start, hw, grid

    def _patches(self, t: Tensor) -> Tensor:
        """``(G, h, w, p)`` view of the patch tokens of ``t``."""
        return t[:, self.start:self.start + self.h * self.w].unflatten(1, (self.h, self.w))

    def __call__(self, t: Tensor) -> Tensor:
        img = self._patches(t).contiguous().permute(0, 3, 1, 2)  # channels last
        pooled = F.adaptive_avg_pool2d(img, self.grid)  # (G, p, s_h, s_w) channels last
        return pooled.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[2])

    def backward_into(self, grad_t: Tensor, grad_r: Tensor) -> None:
        """``grad_t[:, patches] += pooling-gradient(grad_r)`` in place (``grad_r``:
        ``(G, M, p)``)."""
        g, _, p = grad_r.shape
        # the kernel reads only the size and memory format of its input argument
        like = grad_r.new_empty(g, self.h, self.w, p).permute(0, 3, 1, 2)
        grad = torch.ops.aten._adaptive_avg_pool2d_backward(
            grad_r.reshape(g, self.grid[0], self.grid[1], p).permute(0, 3, 1, 2), like)
        self._patches(grad_t).add_(grad.permute(0, 2, 3, 1))


# ----------------------------------------------------------------------------- routing
def _routing(q: Tensor, k: Tensor, r: Tensor, topk: int, rk: Optional[Tensor] = None,
             qr: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Routing decisions in float32 (or better), never in a half dtype (§5b).

    Args:
        q, k: ``(..., N, p)``; r: landmarks ``(..., M, p)`` (the same leading dims,
            ``(G,)`` or ``(B, H)``).
        topk: routed keys per expert ``k' <= N``.
        rk, qr: the raw products ``r kᵀ`` ``(..., M, N)`` and ``q rᵀ`` ``(..., N, M)``
            when already computed in float32 or better (reused), else ``None``.

    Returns:
        ``key_idx (..., M, k')`` (§5.2, unsorted) and ``expert (..., N)`` (§5.4).
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    with torch.no_grad(), torch.autocast(device_type=q.device.type, enabled=False):
        r32 = r.detach().to(acc)
        if rk is None or rk.dtype != acc:
            rk = torch.matmul(r32, k.detach().to(acc).transpose(-1, -2))
        if qr is None or qr.dtype != acc:
            qr = torch.matmul(q.detach().to(acc), r32.transpose(-1, -2))
        key_idx = torch.topk(rk.detach(), topk, dim=-1, sorted=False).indices
        expert = qr.detach().argmax(dim=-1)
    return key_idx, expert


# ----------------------------------------------------------------------------- dense path
def _dense_sample(q: Tensor, k: Tensor, v: Tensor, pool: _TokenPool, topk: int,
                  routed: bool, scale: float, key_idx: Optional[Tensor],
                  expert: Optional[Tensor], out: Optional[Tensor] = None
                  ) -> Tuple[Tensor, ...]:
    """The mixture for the ``H`` heads of one sample on all ``N`` keys at once
    (§5.1–5.5): every query's products with all keys are one batched GEMM, its ``k'``
    routed logits are gathered from it, and the softmax weights are scattered back into
    the same ``N × N`` buffer for the value product.

    Args:
        q, k, v: ``(H, N, p)`` (strided views of the projection).
        pool: the landmark pooling (§5.1).
        topk: ``k'``.
        routed: no agent expert (``mode='routed'``).
        scale: ``1/√p``.
        key_idx, expert: the routing ``(H, M, k')``, ``(H, N)``, or ``None``: routed
            here on the products the attention computes anyway (float32 or better
            only; the caller routes reduced-precision inputs itself, §5b).
        out: optional ``(H, N, p)`` view to write the output into (no autograd).

    Returns:
        ``out (H, N, p)``, the softmax weights ``w (H, N, [M +] k')``, the landmarks
        ``r (H, M, p)``, the agent attention ``A (H, M, N)`` and agent values
        ``(H, M, p)`` (both ``None`` in routed mode), ``key_idx``, ``expert``.
    """
    h, n, p = q.shape
    with torch.set_grad_enabled(torch.is_grad_enabled() and not routed):
        r = pool(q)  # §5.1
    rk = torch.bmm(r, k.transpose(1, 2))  # (H, M, N)
    qr = torch.bmm(q, r.transpose(1, 2))  # (H, N, M)
    if key_idx is None:  # §5.2, §5.4 on the products above (float32 or better here)
        key_idx = torch.topk(rk.detach(), topk, dim=-1, sorted=False).indices
        expert = qr.detach().argmax(dim=-1)
    idx = key_idx.gather(1, expert.unsqueeze(-1).expand(h, n, topk))
    dots = torch.bmm(q, k.transpose(1, 2))  # (H, N, N)
    logits = dots.gather(2, idx) * scale  # (H, N, k')
    attn = agent_v = None
    if routed:
        wts = w_routed = _softmax(logits)
    else:
        m = r.shape[1]
        attn = _softmax(rk * scale)  # §5.3 A = softmax_n(r_m·k_n/√p)  (H, M, N)
        agent_v = torch.bmm(attn, v)  # (H, M, p)
        wts = _softmax(torch.cat((qr * (1.0 / p), logits), dim=2))
        w_routed = wts[..., m:]
    # without autograd the (H, N, N) buffer of the products is reused
    probs = dots.detach().zero_() if not torch.is_grad_enabled() else torch.zeros_like(dots)
    probs = probs.to(w_routed.dtype).scatter_(2, idx, w_routed)
    res = torch.bmm(probs, v)
    if not routed:
        res = res.baddbmm(wts[..., :m], agent_v)
    # computed contiguous, then copied: writing bmm/baddbmm into the strided view
    # instead made the module's fwd+bwd 1.03x slower (N=197, B=8, 1 thread)
    out = res if out is None else out.copy_(res)
    return out, wts, r, attn, agent_v, key_idx, expert


def _dense_forward(y: Tensor, heads: int, head_dims: int, pool: _TokenPool, topk: int,
                   routed: bool, routing: Optional[Tuple[Tensor, Tensor]],
                   out: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
    """:func:`_dense_sample` for every sample of the projection ``y (B, N, parts·C)``
    (its ``q, k, v`` heads read as strided views; one sample's ``H × N × N`` products
    stay in cache between the operations).

    Args:
        y: the input projection, chunks ``q, k, v`` (``g``).
        heads, head_dims: ``H``, ``p`` (``C = H·p``).
        pool, topk, routed: as in :func:`_dense_sample`.
        routing: ``(key_idx (B·H, M, k'), expert (B·H, N))`` or ``None``.
        out: optional ``(B, N, C)`` buffer, written in place (no autograd).

    Returns:
        ``out (B, N, C)`` (heads concatenated) and the other results of
        :func:`_dense_sample` for the ``B·H`` groups concatenated (``None`` where
        absent).
    """
    b, n, _ = y.shape
    scale = head_dims ** -0.5
    heads_of = y.view(b, n, -1, heads, head_dims).transpose(1, 3)  # (B, H, parts, N, p)
    results = []
    for i in range(b):
        q, k, v = heads_of[i, :, 0], heads_of[i, :, 1], heads_of[i, :, 2]
        sl = slice(i * heads, (i + 1) * heads)
        ki, ex = (None, None) if routing is None else (routing[0][sl], routing[1][sl])
        dst = None if out is None else out[i].view(n, heads, head_dims).transpose(0, 1)
        results.append(_dense_sample(q, k, v, pool, topk, routed, scale, ki, ex, dst))
    merged = [None if part[0] is None else part[0] if b == 1 else torch.cat(part)
              for part in zip(*(res[1:] for res in results))]
    if out is None:
        out = torch.stack([res[0] for res in results]).transpose(1, 2).reshape(
            b, n, heads * head_dims)
    return (out, *merged)


class _DenseMiTA(torch.autograd.Function):
    """:func:`_dense_forward` with a hand-written backward, sample by sample (2
    token-pair GEMMs forward, 4 backward; one ``H × N × N`` buffer per sample serves
    all of them). Input: the projection ``y (B, N, parts·C)``; the gradients of its
    ``q, k, v`` chunks are written straight into ``∂y``, the landmark gradient (agent
    path) into ``∂q`` through the pooling.

    ``merged``: chunks of ``y`` also returned as ``(B, N, C)`` copies (``v`` for +DWC,
    ``g`` for the gate); their gradients are added into ``∂y``.

    Returns ``out (B, N, C)``, ``key_idx``, ``expert`` (no gradient), then the
    ``merged`` copies.
    """

    @staticmethod
    def forward(ctx, y: Tensor, key_idx: Optional[Tensor], expert: Optional[Tensor],
                heads: int, head_dims: int, pool: _TokenPool, topk: int, routed: bool,
                merged: Tuple[int, ...]):
        b, n, _ = y.shape
        c = heads * head_dims
        routing = None if key_idx is None else (key_idx, expert)
        out, wts, r, attn, agent_v, key_idx, expert = _dense_forward(
            y, heads, head_dims, pool, topk, routed, routing, out=y.new_empty(b, n, c))
        ctx.save_for_backward(y, r, attn, agent_v, wts, key_idx, expert)
        ctx.heads, ctx.head_dims, ctx.pool, ctx.routed, ctx.merged = (heads, head_dims,
                                                                      pool, routed, merged)
        ctx.mark_non_differentiable(key_idx, expert)
        return (out, key_idx, expert) + tuple(y[..., i * c:(i + 1) * c].contiguous()
                                              for i in merged)

    @staticmethod
    def backward(ctx, grad_out: Tensor, _ki, _ex, *grad_merged: Optional[Tensor]):
        y, r, attn, agent_v, wts, key_idx, expert = ctx.saved_tensors
        heads, p, routed = ctx.heads, ctx.head_dims, ctx.routed
        b, n, width = y.shape
        c = heads * p
        scale = p ** -0.5
        m = 0 if routed else r.shape[1]
        topk = key_idx.shape[2]
        grad_y = y.new_empty(b, n, width)
        for j in range(3, width // c):  # chunks beyond q, k, v: only a merged gradient
            if j not in ctx.merged or grad_merged[ctx.merged.index(j)] is None:
                grad_y[..., j * c:(j + 1) * c].zero_()
        grad_out = grad_out.contiguous()
        heads_of = y.view(b, n, -1, heads, p).transpose(1, 3)  # (B, H, parts, N, p)
        grad_of = grad_y.view(b, n, -1, heads, p).transpose(1, 3)
        for i in range(b):
            sl = slice(i * heads, (i + 1) * heads)
            q, k, v = heads_of[i, :, 0], heads_of[i, :, 1], heads_of[i, :, 2]
            # gradients computed contiguous, then copied into ∂y (in place: see forward)
            gq, gk, gv = (q.new_empty(q.shape) for _ in range(3))
            do = grad_out[i].view(n, heads, p).transpose(0, 1)
            w = wts[sl]
            idx = key_idx[sl].gather(1, expert[sl].unsqueeze(-1).expand(heads, n, topk))
            # out = probs v (+ w_a agent_v); one (H, N, N) buffer serves as ∂probs, probs
            # and ∂(q kᵀ) in turn (they share the sparsity pattern idx)
            buf = torch.bmm(do, v.transpose(1, 2))  # ∂probs
            grad_w = buf.gather(2, idx)  # (H, N, k')
            probs = buf.zero_().scatter_(2, idx, w[..., m:])
            torch.bmm(probs.transpose(1, 2), do, out=gv)
            if not routed:
                grad_w = torch.cat((torch.bmm(do, agent_v[sl].transpose(1, 2)), grad_w), 2)
                grad_agent_v = torch.bmm(w[..., :m].transpose(1, 2), do)  # (H, M, p)
            grad_logits = _softmax_backward(grad_w, w)
            # routed logits = scale · (q kᵀ) gathered at idx: same pattern as probs, whose
            # non-zeros (distinct keys per row) are all overwritten
            grad_s = probs.scatter_(2, idx, grad_logits[..., m:] * scale)
            torch.bmm(grad_s, k, out=gq)
            torch.bmm(grad_s.transpose(1, 2), q, out=gk)
            if not routed:
                rs, a = r[sl], attn[sl]
                grad_la = grad_logits[..., :m]  # agent logits = q rᵀ / p
                gq.baddbmm_(grad_la, rs, alpha=1.0 / p)
                grad_r = torch.bmm(grad_la.transpose(1, 2), q).mul_(1.0 / p)  # (H, M, p)
                # agent_v = A v, A = softmax(scale · r kᵀ)
                gv.baddbmm_(a.transpose(1, 2), grad_agent_v)
                grad_rk = _softmax_backward(torch.bmm(grad_agent_v, v.transpose(1, 2)), a)
                grad_r.baddbmm_(grad_rk, k, alpha=scale)
                gk.baddbmm_(grad_rk.transpose(1, 2), rs, alpha=scale)
                ctx.pool.backward_into(gq, grad_r)
            for part, src in enumerate((gq, gk, gv)):
                grad_of[i, :, part].copy_(src)
        for j, g in zip(ctx.merged, grad_merged):
            if g is not None:
                dst = grad_y[..., j * c:(j + 1) * c]
                dst.add_(g) if j < 3 else dst.copy_(g)
        return grad_y, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------- masked path
def _masked_core(q: Tensor, k: Tensor, v: Tensor, pool: _TokenPool, topk: int, routed: bool,
                 routing: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor, Tensor]:
    """§5.1–5.5 as ONE attention call per layer (plus the shared expert's): every
    query attends to a key table through a boolean mask that opens exactly its ``M``
    landmark keys and the ``k'`` routed keys of its expert.

    Key table (the cheaper of two, chosen from the sizes alone): all ``N`` keys when
    ``N <= M·k'`` (mask: ``j ∈ I_{e(n)}``), else the ``M`` experts' gathered tables of
    ``k'`` keys each, ``M·k'`` rows (mask: row ``j`` belongs to expert ``e(n)``). In
    mixture mode the ``M`` landmark keys ``r/√p`` (so that SDPA's ``1/√p`` gives the
    agent logits ``q·r/p``) with the shared expert's values ``a = SDPA(r, k, v)`` are
    prepended and always open. Nothing depends on the routing's values but the mask:
    no host synchronisation, no per-sample or per-expert loop, no data-dependent shape
    (``torch.compile`` captures it whole; CUDA graphs can replay it).

    Args:
        q, k, v: ``(B, H, N, p)`` (views of the projection).
        pool: the landmark pooling (§5.1).
        topk: ``k'``.
        routed: no shared expert (``mode='routed'``).
        routing: ``(key_idx, expert)`` as ``(B·H, M, k')``, ``(B·H, N)``, or ``None``
            (routed here in float32, §5b).

    Returns:
        ``out (B, H, N, p)``, ``key_idx (B, H, M, k')``, ``expert (B, H, N)``.
    """
    b, h, n, p = q.shape
    scale = p ** -0.5
    with torch.set_grad_enabled(torch.is_grad_enabled() and not routed):
        r = pool(q.flatten(0, 1)).unflatten(0, (b, h))  # (B, H, M, p)
    m = r.shape[2]
    if routing is None:
        key_idx, expert = _routing(q, k, r, topk)
    else:
        key_idx, expert = routing[0].view(b, h, m, topk), routing[1].view(b, h, n)
    if n <= m * topk:  # all N keys; member[.., e, j]: key j is routed by expert e
        member = torch.zeros(b, h, m, n, dtype=torch.bool, device=q.device).scatter_(
            3, key_idx, True)
        keys, values = k, v
        mask = member.gather(2, expert.unsqueeze(-1).expand(b, h, n, n))
    else:  # the experts' tables, M·k' rows; row j belongs to expert j // k'
        rows = key_idx.flatten(2).unsqueeze(-1).expand(b, h, m * topk, p)
        keys, values = k.gather(2, rows), v.gather(2, rows)
        owner = torch.arange(m * topk, device=q.device) // topk
        mask = expert.unsqueeze(-1) == owner
    if not routed:
        agent_v = F.scaled_dot_product_attention(r, k, v, scale=scale)  # §5.3 (B, H, M, p)
        keys = torch.cat((r * scale, keys), dim=2)
        values = torch.cat((agent_v, values), dim=2)
        mask = torch.cat((mask.new_ones(b, h, n, m), mask), dim=3)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return out, key_idx, expert


# ----------------------------------------------------------------------------- grouped path
@torch.compiler.disable  # data-dependent output sizes: run eagerly under torch.compile
def _expert_blocks(expert: Tensor, num_experts: int,
                   block: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Group queries by expert into blocks of ``block`` slots.

    Args:
        expert: ``(G, N)`` expert id in ``[0, M)`` of every query of each group
            (a group is one ``(batch, head)`` pair).
        num_experts: ``M``.
        block: slots per block ``T``.

    Returns:
        ``slot_query`` ``(nb*T,)``: flat query id ``g*N + n`` held by each slot
        (``0`` for the padding slots at the end of an expert's last block);
        ``slot_valid`` ``(nb*T,)``: bool, False for those padding slots;
        ``query_slot`` ``(G*N,)``: the slot of each flat query id;
        ``block_expert`` ``(nb,)``: flat expert id ``g*M + m`` of each block.
    """
    g, n = expert.shape
    dev = expert.device
    flat = (expert + torch.arange(g, device=dev).unsqueeze(1) * num_experts).reshape(-1)
    order = torch.argsort(flat, stable=True)  # flat query ids, grouped by expert
    f_sorted = flat[order]
    bounds = torch.searchsorted(f_sorted, torch.arange(g * num_experts + 1, device=dev))
    seg_start, counts = bounds[:-1], bounds[1:] - bounds[:-1]  # queries per expert
    nblk = (counts + block - 1) // block  # blocks per expert
    blk_start = torch.cumsum(nblk, 0) - nblk
    rank = torch.arange(g * n, device=dev) - seg_start[f_sorted]  # position inside the expert
    slot = (blk_start[f_sorted] + torch.div(rank, block, rounding_mode='floor')) * block \
        + rank % block
    num_blocks = int(nblk.sum())  # data-dependent
    slot_query = torch.zeros(num_blocks * block, dtype=torch.long, device=dev)
    slot_query[slot] = order
    slot_valid = torch.zeros(num_blocks * block, dtype=torch.bool, device=dev)
    slot_valid[slot] = True
    query_slot = torch.empty(g * n, dtype=torch.long, device=dev)
    query_slot[order] = slot
    block_expert = torch.repeat_interleave(
        torch.arange(g * num_experts, device=dev), nblk, output_size=num_blocks)
    return slot_query, slot_valid, query_slot, block_expert


class _MoveRows(torch.autograd.Function):
    """``src.index_select(0, index)`` for a one-to-one move of rows, whose backward
    is the inverse move (another gather) instead of a scatter-add.

    ``inverse`` ``(len(src),)``: for each source row, the output row it went to.
    ``grad_keep`` (optional, bool ``(len(src),)``): source rows that receive a
    gradient; the others (padding rows that were not moved) get zero.
    """

    @staticmethod
    def forward(ctx, src: Tensor, index: Tensor, inverse: Tensor,
                grad_keep: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(inverse, grad_keep)
        return src.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        inverse, grad_keep = ctx.saved_tensors
        grad_src = grad.index_select(0, inverse)
        if grad_keep is not None:
            grad_src = grad_src * grad_keep.unsqueeze(1).to(grad_src.dtype)
        return grad_src, None, None, None


def _grouped_core(q: Tensor, k: Tensor, v: Tensor, r: Tensor, rk: Optional[Tensor],
                  key_idx: Tensor, expert: Tensor, routed: bool, scale: float, block: int,
                  max_blocks: int) -> Tensor:
    """Same result as :func:`_dense_chunk`, queries grouped by expert (plain autograd).

    Args:
        q, k, v: ``(G, N, p)``; r: landmarks ``(G, M, p)``.
        rk: raw ``r kᵀ (G, M, N)`` (mixture only).
        key_idx: ``(G, M, k')``; expert: ``(G, N)``.
        routed, scale: as in :func:`_dense_chunk`.
        block, max_blocks: queries per block, blocks per SDPA call.

    Returns:
        ``out (G, N, p)``.
    """
    g, n, p = q.shape
    m, topk = r.shape[1], key_idx.shape[2]
    k_rows, v_rows = k.reshape(g * n, p), v.reshape(g * n, p)  # token rows (views)
    with torch.no_grad():
        key_rows = (key_idx + torch.arange(g, device=q.device).view(g, 1, 1) * n).view(-1)
        slot_query, slot_valid, query_slot, block_expert = _expert_blocks(expert, m, block)
    # per-expert key/value tables (G·M, [M +] k', p): [landmarks / p ;] routed keys / √p
    keys = k_rows.index_select(0, key_rows).view(g, m, topk, p) * scale
    values = v_rows.index_select(0, key_rows).view(g, m, topk, p)
    if not routed:
        attn = _softmax(rk * scale)  # §5.3 shared expert
        agent_v = torch.bmm(attn, v)  # (G, M, p)
        keys = torch.cat(((r * (1.0 / p)).unsqueeze(1).expand(g, m, m, p), keys), dim=2)
        values = torch.cat((agent_v.unsqueeze(1).expand(g, m, m, p), values), dim=2)
    keys, values = keys.reshape(g * m, -1, p), values.reshape(g * m, -1, p)
    # queries -> expert blocks (padding slots repeat query 0; their outputs are never
    # read back, so they touch neither the result nor any gradient)
    q_blk = _MoveRows.apply(q.reshape(g * n, p), slot_query, query_slot, None)
    q_blk = q_blk.view(1, -1, block, p)  # blocks as "heads" (CPU flash kernel)
    keys = keys.index_select(0, block_expert).unsqueeze(0)  # (1, nb, [M +] k', p)
    values = values.index_select(0, block_expert).unsqueeze(0)
    out_blk = torch.cat([
        F.scaled_dot_product_attention(qc, kc, vc, scale=1.0) for qc, kc, vc in zip(
            q_blk.split(max_blocks, 1), keys.split(max_blocks, 1),
            values.split(max_blocks, 1))], dim=1)
    out = _MoveRows.apply(out_blk.reshape(-1, p), query_slot, slot_query, slot_valid)
    return out.view(g, n, p)


# ----------------------------------------------------------------------------- module
@register_model()
class MiTA(BaseModule):
    """Mixture-of-Top-k Attention (docs/mechanisms.md §5, §5b).

    With ``q, k, v = Linear_{C→3C}(x)`` split into ``H`` heads of width ``p = C/H``:

    1. landmarks ``r`` ``(B, H, M, p)``: adaptive average pooling of the patch tokens
       of ``q`` onto an ``s_h × s_w`` grid (``M = s_h·s_w``);
    2. routed experts: ``I_m = top-k'_n(r_m · k_n)`` with ``k' = min(k, N)`` (no
       scale, no gradient): with fewer tokens than ``topk`` every expert routes to
       all ``N`` keys;
    3. shared expert (agent values): ``a_m = softmax_n(r_m · k_n / √p) v``;
    4. gate: ``e(n) = argmax_m(r_m · q_n)`` (no gradient);
    5. ``mode='mixture'``: one softmax per query over ``M`` agent logits
       ``q_n · r_m / p`` (values ``a_m``) and ``k'`` routed logits
       ``q_n · k_j / √p``, ``j ∈ I_{e(n)}`` (values ``v_j``);
       ``mode='routed'``: no shared expert (step 3 and the agent logits are
       dropped), one softmax over the ``k'`` routed logits only;
    6. heads concatenated ``o (B, N, C)``; ``+DWC``: ``o ← o + DWC_{3×3}(v)`` on
       the patch tokens (prefix tokens get nothing); ``gate``:
       ``o ← o ⊙ SiLU(g)``; then ``Linear_{C→C}``.

    With ``gate=True`` the input projection is ``qkvg = Linear_{C→4C}`` whose
    output chunks are ``q, k, v, g`` in that order (the reference's
    ``MiTA_Attention_Conv_Gate`` layout; otherwise ``qkv = Linear_{C→3C}``).
    Routing (steps 2 and 4) is computed in float32 (or float64) whatever the
    activation dtype (§5b). Under autocast (or any compute dtype below the input's
    precision) the routing logits come from a float32 projection of the input (one
    extra forward-only GEMM for ``q`` and ``k``), so the decisions are exactly those of
    the float32 model: upcasting the bf16 ``q, k`` instead leaves the 99th percentile
    of the per-token relative error vs float32 at ≈ 0.4 (as before the change), the
    float32 projection brings it to ≈ 0.006 (C=384, H=6, N = 1 + 16·16 and 1 + 12·20).
    The attention itself runs in the autocast dtype with float32 softmax statistics.

    Reference arguments (``mmcbsa.converters.mita_kwargs_from_reference``):
    ``MiTA_Attention(pool_size=P, kv_topk=K)`` ↔ ``num_landmarks=P², topk=K²``;
    ``MiTA_Attention_Conv`` ↔ ``num_landmarks=25, topk=25, dwc=True``;
    ``MiTA_Attention_Conv_Gate`` ↔ ``num_landmarks=25, topk=25, dwc=True,
    gate=True``; ``MiTA_Attention_Route`` (``pool_size = P``, it routes
    ``kv_topk·2 = 2P²`` keys) ↔ ``mode='routed', num_landmarks=P², topk=2P²``;
    all with ``legacy_pooling=True``.

    Execution paths (same result up to float rounding): ``'masked'`` (automatic on
    CUDA) is one masked SDPA call over a key table, ``'kernel'`` runs the
    compiled CPU kernel (:mod:`mmcbsa.ops.mita_cpu`: only the ``M + k'`` open logits
    of each query, ``O(N·(M + k')·p)``), ``'dense'`` gathers the routed logits from
    the full ``N × N`` logit matrix (no data-dependent shapes, ``O(N²)`` memory),
    ``'grouped'`` sorts queries by expert (``O(N)`` memory, a data-dependent block
    count). ``path='auto'`` takes the masked path for CUDA inputs, the kernel for CPU
    inputs computed in float32 or float64 whenever it is built (see :meth:`use_kernel`),
    else ``'dense'`` for
    ``N <= dense_max_tokens`` (by default a cost model, see :meth:`use_dense`) and
    ``'grouped'`` above. Measured (fwd+bwd against ``MHSA`` (SDPA), C=384, H=6,
    M=k=25, docs/benchmark_attention.md, "MiTA at DeiT's size"):
    ``benchmark_attention.py`` defaults (batch 1, 2 threads, wall time, idle 2-core
    machine): kernel 0.93× (0.86–0.93× in repeats) at ``N = 197`` and 0.18× at
    ``N = 4097``, against 1.77× (dense) and 0.27× (grouped) for the PyTorch paths;
    1 CPU thread, CPU time, batch 8: kernel 0.91×, dense 1.35×. The PyTorch paths
    compute 50
    logits per query through gathers, scatters and separate top-k, argmax and
    softmax kernels, which cost more than the fused SDPA kernel's 197 at this size.

    ``torch.compile``: the kernel is one custom op (``mmcbsa::mita_cpu_forward``,
    backward registered) and the dense path has no data-dependent shapes: each is
    captured as one graph. The grouped path breaks the
    graph at its expert-block bookkeeping (:func:`_expert_blocks`, excluded from
    compilation with ``torch.compiler.disable``: the number of blocks depends on the
    routing); dynamo reports that break once per enclosing frame (3 breaks), the rest
    runs in compiled pieces. Checked with the inductor backend: forward and gradients
    equal eager to ~1e-6 (float32) on the dense and grouped paths.

    Args:
        embed_dims: token width ``C``.
        num_heads: heads ``H``.
        num_landmarks: number of landmarks ``M`` (a perfect square, pooled on a
            square grid) or the grid ``(s_h, s_w)``. Default 25 (5×5, MiTA-DeiT).
            More landmarks than patch tokens is allowed (pooling repeats tokens)
            and warned about once.
        topk: routed keys per expert ``k`` (used as ``min(k, N)``). Default 25
            (MiTA-DeiT); the reference routed-only variant uses ``2·M``.
        qkv_bias: bias of the input projection (DeiT: True).
        proj_bias: bias of the output projection.
        dwc: add a 3×3 depth-wise conv of the patch-token values to the output
            before the projection (the ``+DWC`` variant); prefix tokens get nothing.
        gate: the ``+Gate`` variant: input projection ``Linear_{C→4C}`` (``qkvg``)
            and ``o ← o ⊙ SiLU(g)`` after the DWC sum (with or without ``dwc``).
        mode: ``'mixture'`` (shared agent expert + routed experts, the paper's
            MiTA) or ``'routed'`` (routed experts only).
        legacy_pooling: pool the landmarks like the reference implementation (first
            ``N−1`` tokens on a ``⌊√N⌋`` square; needed for released checkpoints).
        path: ``'auto'``, ``'kernel'``, ``'masked'``, ``'dense'`` or ``'grouped'`` (see
            above; a speed and memory choice, the result does not depend on it).
            ``'kernel'`` raises where the kernel cannot run (not a CPU float32/float64
            input, or not built: the error gives the reason).
        dense_max_tokens: largest token count ``N`` that ``path='auto'`` runs
            densely; default (None): the cost model ``N <= 10·(M + k')`` (``M`` only
            in mixture mode), i.e. ``N <= 500`` for MiTA-DeiT (``M = k = 25``) and
            ``N <= 980`` for the segmentation encoder (``M = k = 49``).
        query_block_size: queries per block in the grouped path (a pure
            speed/memory knob; results do not depend on it).
        max_blocks_per_call: blocks per attention kernel call in the grouped path;
            larger inputs are processed in chunks of that many blocks.
        proj_drop: dropout after the projection.
        init_cfg: mmengine init config.

    Attributes:
        record_attention: set to True to keep, after each forward (detached),
            ``last_expert`` ``(B, H, N)`` long — the expert ``e(n)`` of every token,
            prefix tokens included —, ``last_routed_keys`` ``(B, H, M, k')`` long —
            the token indices ``I_m`` each expert routes to (a set: their order
            depends on the execution path) — and ``last_hw_shape``
            ``(h, w)`` of the patch grid.

    Shapes: ``x (B, N, C)``, ``hw_shape=(h, w)`` with ``h*w <= N`` (prefix tokens
    first) -> ``(B, N, C)``.
    """

    def __init__(self, embed_dims: int, num_heads: int, num_landmarks: GridLike = 25,
                 topk: int = 25, qkv_bias: bool = True, proj_bias: bool = True,
                 dwc: bool = False, gate: bool = False, mode: str = 'mixture',
                 legacy_pooling: bool = False, path: str = 'auto',
                 dense_max_tokens: Optional[int] = None, query_block_size: int = 64,
                 max_blocks_per_call: int = 16384, proj_drop: float = 0.,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.head_dims = resolve_head_dims(embed_dims, num_heads, None, 'MiTA')
        self.landmark_grid = to_grid(num_landmarks, 'num_landmarks', 'MiTA')
        self.num_landmarks = self.landmark_grid[0] * self.landmark_grid[1]
        self.topk = check_positive(topk, 'topk', 'MiTA')
        if mode not in MODES:
            raise ValueError(f'MiTA: mode must be one of {MODES}, got {mode!r}')
        if path not in PATHS:
            raise ValueError(f'MiTA: path must be one of {PATHS}, got {path!r}')
        self.dense_max_tokens = None if dense_max_tokens is None else check_positive(
            dense_max_tokens, 'dense_max_tokens', 'MiTA')
        self.query_block_size = check_positive(query_block_size, 'query_block_size', 'MiTA')
        self.max_blocks_per_call = check_positive(max_blocks_per_call, 'max_blocks_per_call',
                                                  'MiTA')
        self.embed_dims, self.num_heads = embed_dims, num_heads
        self.mode, self.path, self.gate = mode, path, bool(gate)
        self.legacy_pooling = legacy_pooling
        if self.gate:
            self.qkvg = nn.Linear(embed_dims, 4 * embed_dims, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(embed_dims, 3 * embed_dims, bias=qkv_bias)
        self.dwc = nn.Conv2d(embed_dims, embed_dims, 3, padding=1, groups=embed_dims) \
            if dwc else None
        self.proj = nn.Linear(embed_dims, embed_dims, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        if path in ('auto', 'kernel'):
            mita_cpu.available()  # compiles the CPU kernel once per process (cached on disk)
        self.record_attention = False
        self.last_expert: Optional[Tensor] = None
        self.last_routed_keys: Optional[Tensor] = None
        self.last_hw_shape: Optional[Tuple[int, int]] = None

    def extra_repr(self) -> str:
        return (f'embed_dims={self.embed_dims}, num_heads={self.num_heads}, '
                f'landmark_grid={self.landmark_grid}, topk={self.topk}, mode={self.mode!r}, '
                f'gate={self.gate}, legacy_pooling={self.legacy_pooling}, path={self.path!r}')

    @property
    def in_proj(self) -> nn.Linear:
        """The input projection: ``qkv`` (``C → 3C``) or ``qkvg`` (``C → 4C``)."""
        return self.qkvg if self.gate else self.qkv

    def _pool_spec(self, n: int, hw: Optional[Tuple[int, int]]) -> Tuple[int, int, int]:
        """``(start, h, w)``: the tokens pooled into landmarks (§5.1, legacy form)."""
        if self.legacy_pooling:
            side = math.isqrt(max(n - 1, 0))
            if side < 1 or side * side != n - 1:
                raise ValueError(f'MiTA: legacy_pooling needs N - 1 to be a square number '
                                 f'of tokens (reference behaviour), got N={n}')
            return 0, side, side
        return n - hw[0] * hw[1], hw[0], hw[1]

    def use_dense(self, num_tokens: int) -> bool:
        """Whether a forward over ``num_tokens`` tokens takes the dense path.

        ``path='auto'``: ``N <= dense_max_tokens`` or, by default, the cost model
        ``N <= 10·(M + k')``: the dense path does ``O(N²·p)`` work in a few large
        GEMMs, the grouped one ``O(N·(M + k')·p)`` plus a sorting and gathering
        overhead worth about ten times that; measured crossovers on CPU (fwd+bwd,
        C=384, H=6): between N=400 and 784 for M=k=25, between 784 and 1024 for
        M=k=49.
        """
        if self.path != 'auto':
            return self.path == 'dense'
        if self.dense_max_tokens is not None:
            return num_tokens <= self.dense_max_tokens
        experts = 0 if self.mode == 'routed' else self.num_landmarks
        return num_tokens <= 10 * (experts + min(self.topk, num_tokens))

    def use_masked(self, x: Tensor) -> bool:
        """Whether this forward takes the masked path (:func:`_masked_core`): with
        ``path='masked'``, and with ``path='auto'`` for every CUDA input (one attention
        call, no host synchronisation, no data-dependent shape)."""
        return self.path == 'masked' or (self.path == 'auto' and x.device.type == 'cuda')

    def use_kernel(self, x: Tensor, dtype: torch.dtype, routed_outside: bool) -> bool:
        """Whether this forward runs the compiled CPU kernel (:mod:`mmcbsa.ops.mita_cpu`).

        ``path='auto'`` takes it whenever it can run: a CPU input computed in float32 or
        float64 (not under reduced-precision autocast, whose routing comes from a float32
        projection), not traced or scripted (FLOP counting and export see the PyTorch
        path), and the kernel compiled. ``path='kernel'`` raises where it cannot run.
        """
        if self.path not in ('auto', 'kernel'):
            return False
        why = None
        if x.device.type != 'cpu':
            why = f'a CPU input (got {x.device.type})'
        elif dtype not in mita_cpu.DTYPES or routed_outside:
            why = f'float32 or float64 computation (got {dtype})'
        elif torch.jit.is_tracing() or torch.jit.is_scripting():
            why = 'eager or torch.compile execution (not TorchScript)'
        elif not (mita_cpu.loaded() or (not torch.compiler.is_compiling()
                                        and mita_cpu.available())):
            why = f'the compiled kernel ({mita_cpu.unavailable_reason()})'
        if why is not None and self.path == 'kernel':
            raise ValueError(f"MiTA: path='kernel' needs {why}; use path='auto'")
        return why is None

    def forward(self, x: Tensor, hw_shape: Optional[Sequence[int]] = None) -> Tensor:
        """``x (B, N, C)`` -> ``(B, N, C)``; see the class docstring."""
        check_input_width(x, self.embed_dims, 'MiTA')
        b, n, c = x.shape
        hw = None
        if not self.legacy_pooling or self.dwc is not None:
            hw = check_hw_shape(x, hw_shape, 'MiTA')
        start, ph, pw = self._pool_spec(n, hw)
        m, topk = self.num_landmarks, min(self.topk, n)
        if m > ph * pw:
            warn_once(f'MiTA-landmarks-{m}-{ph}x{pw}',
                      f'MiTA: {m} landmarks ({self.landmark_grid[0]}x{self.landmark_grid[1]}) '
                      f'pooled from only {ph * pw} patch tokens ({ph}x{pw}): landmarks repeat '
                      'tokens')
        heads, p = self.num_heads, self.head_dims
        scale, routed = p ** -0.5, self.mode == 'routed'
        pool = _TokenPool(start, (ph, pw), self.landmark_grid)
        dtype = _compute_dtype(x)
        fused = (torch.is_grad_enabled() and not torch.jit.is_tracing()
                 and not torch.jit.is_scripting())
        proj = self.in_proj
        with torch.autocast(device_type=x.device.type, enabled=False):
            x_in, x = x, x.to(dtype)
            parts = 4 if self.gate else 3
            y = F.linear(x, proj.weight.to(dtype),
                         None if proj.bias is None else proj.bias.to(dtype))
            merged = (2, ) * (self.dwc is not None) + (3, ) * self.gate
            dense = self.use_dense(n)
            routing = None
            acc = torch.promote_types(x_in.dtype, torch.float32)
            if dtype != acc:
                # §5b: reduced-precision attention routes on a float32 projection of the
                # input (rounding q and k first would flip near-tied decisions)
                with torch.no_grad():
                    q_r, k_r = _split_heads(F.linear(
                        x_in.to(acc), proj.weight[:2 * c].to(acc),
                        None if proj.bias is None else proj.bias[:2 * c].to(acc)), 2, heads,
                        split=2)
                    routing = _routing(q_r, k_r, pool(q_r), topk)
            if self.use_kernel(x, dtype, routing is not None):
                out, key_idx, expert = mita_cpu.mita_forward(
                    y, heads, p, (start, ph, pw, *self.landmark_grid), topk, routed)
                extra = {i: y[:, :, i * c:(i + 1) * c] for i in merged}  # v (+DWC), g (gate)
            elif self.use_masked(x):
                qkv = y.view(b, n, parts, heads, p)
                out, key_idx, expert = _masked_core(
                    *(qkv[:, :, i].transpose(1, 2) for i in range(3)), pool, topk, routed,
                    routing)  # q, k, v as (B, H, N, p) views
                out = out.transpose(1, 2).reshape(b, n, c)
                extra = {i: y[:, :, i * c:(i + 1) * c] for i in merged}  # v (+DWC), g (gate)
            elif dense:
                # q, k, v read per sample as strided views of y; output written as (B, N, C)
                if fused:
                    out, key_idx, expert, *extra = _DenseMiTA.apply(
                        y, *(routing or (None, None)), heads, p, pool, topk, routed, merged)
                else:
                    out, _, _, _, _, key_idx, expert = _dense_forward(
                        y, heads, p, pool, topk, routed, routing,
                        out=None if torch.is_grad_enabled() else y.new_empty(b, n, c))
                    extra = _split_heads(y, parts, heads, merged, split=0)
                extra = dict(zip(merged, extra))
            else:
                # token-major heads: q, k, v (B·H, N, p); v and g also as (B, N, C) if needed
                split = (_SplitHeads.apply(y, parts, heads, merged) if fused
                         else _split_heads(y, parts, heads, merged))
                q, k, v = split[:3]
                extra = dict(zip(merged, split[3:]))
                # §5.1 landmarks; their gradient comes through the agent path only
                with torch.set_grad_enabled(torch.is_grad_enabled() and not routed):
                    r = pool(q)
                rk = None if routed else torch.bmm(r, k.transpose(1, 2))  # (G, M, N)
                key_idx, expert = routing or _routing(q, k, r, topk, rk)
                out = _grouped_core(q, k, v, r, rk, key_idx, expert, routed, scale,
                                    self.query_block_size, self.max_blocks_per_call)
                out = out.view(b, heads, n, p).transpose(1, 2).reshape(b, n, c)
            if self.dwc is not None:
                # +DWC: 3×3 depth-wise conv of the patch-token values, prefix gets 0
                npre = n - hw[0] * hw[1]
                v_img = extra[2][:, npre:].unflatten(1, hw).permute(0, 3, 1, 2)
                local = F.conv2d(v_img, self.dwc.weight.to(dtype), self.dwc.bias.to(dtype)
                                 if self.dwc.bias is not None else None, padding=1,
                                 groups=c).flatten(2).transpose(1, 2)
                out = torch.cat((out[:, :npre], out[:, npre:] + local), dim=1)
            if self.gate:
                out = out * F.silu(extra[3])
            y = F.linear(out, self.proj.weight.to(dtype),
                         None if self.proj.bias is None else self.proj.bias.to(dtype))
        if self.record_attention:
            self.last_expert = expert.detach().view(b, heads, n)
            self.last_routed_keys = key_idx.detach().view(b, heads, m, topk)
            self.last_hw_shape = (ph, pw) if hw is None else hw
        return self.proj_drop(y)
