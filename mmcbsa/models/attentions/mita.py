"""MiTA — Mixture-of-Top-k Attention (arXiv 2602.01219; docs/mechanisms.md §5, §5b).

Pure PyTorch and exact: the reference runs through CUDA flash-attn varlen kernels
and merges two partial attentions by log-sum-exp; here both parts are one softmax.
Two exact execution paths compute the same function (chosen by ``path``):

* **dense** (small ``N``): every query's logits against all ``N`` keys are one
  batched GEMM; the ``k`` routed logits of each query are *gathered* from it, and
  the softmax weights are scattered back into an ``N × N`` matrix for the value
  product. No data-dependent shapes (``torch.compile`` traces it without graph
  breaks); ``O(N²)`` memory per head, like softmax attention, so it is only used
  for small ``N``. Training runs through a hand-written backward
  (:class:`_DenseMiTA`: 2 token-pair GEMMs forward, 4 backward).
* **grouped** (large ``N``): every query routed to expert ``m`` sees the *same*
  ``k`` routed keys ``I_m``, so queries are sorted by expert and cut into blocks of
  ``query_block_size`` queries that share one expert (the last block of an expert
  is padded). Each block attends, in one softmax, to its key table (the ``M``
  landmark keys and the expert's ``k`` gathered keys; only the latter in
  ``'routed'`` mode): one batched SDPA over ``(#blocks, T, M + k)`` (chunked over
  blocks); outputs are moved back to token order. Peak memory
  ``O(N·(M + p) + (N/T + M)·(M + k)·p)`` per head, never ``O(N²)``; the block
  size changes nothing but speed. The number of blocks depends on the routing
  (a data-dependent shape).

Everything between the two projections runs channels-first: ``q, k, v`` are
``(B·H, p, N)`` tensors that are contiguous per head (the in-projection writes them
that way), so the token-sized products are plain ``torch.bmm`` calls without
transposed copies; the landmarks are pooled straight from that layout.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor

from mmcbsa.registry import register_model
from .base import (GridLike, check_hw_shape, check_input_width, check_positive,
                   resolve_head_dims, to_grid, warn_once)
from .cbsa import _compute_dtype, _GridPool, _softmax, _softmax_backward

MODES = ('mixture', 'routed')
PATHS = ('auto', 'dense', 'grouped')


# ----------------------------------------------------------------------------- projections
def _in_proj(x: Tensor, weight: Tensor, bias: Optional[Tensor], parts: int,
             heads: int) -> Tuple[Tensor, ...]:
    """``Linear(x)`` (one GEMM) split into ``parts`` chunks of ``C'`` channels, each
    returned channels-first per head: ``(B·H, p, N)`` contiguous (``p = C'/H``)."""
    b, n, _ = x.shape
    p = weight.shape[0] // (parts * heads)
    y = F.linear(x, weight, bias).view(b, n, parts, heads, p)
    return tuple(y.permute(2, 0, 3, 4, 1).reshape(parts, b * heads, p, n).unbind(0))


class _InProj(torch.autograd.Function):
    """:func:`_in_proj` with a backward that writes the output gradients straight
    into the ``(B·N, parts·C')`` layout of the GEMM (one pass, no zero-filled
    buffers) and runs two GEMMs."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], parts: int,
                heads: int):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.parts, ctx.heads = bias is not None, parts, heads
        return _in_proj(x, weight, bias, parts, heads)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        x, weight = ctx.saved_tensors
        b, n, c = x.shape
        parts, heads = ctx.parts, ctx.heads
        p = weight.shape[0] // (parts * heads)
        grad_y = x.new_empty(b, n, parts, heads, p)
        for i, g in enumerate(grads):
            grad_y[:, :, i] = g.view(b, heads, p, n).permute(0, 3, 1, 2)
        grad_y = grad_y.view(b * n, -1)
        grad_x = torch.mm(grad_y, weight).view(b, n, c) if ctx.needs_input_grad[0] else None
        grad_w = torch.mm(grad_y.t(), x.reshape(b * n, c)) if ctx.needs_input_grad[1] else None
        grad_b = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


# ----------------------------------------------------------------------------- routing
def _routing(q_t: Tensor, k_t: Tensor, r_t: Tensor, topk: int,
             rk: Optional[Tensor] = None, qr: Optional[Tensor] = None
             ) -> Tuple[Tensor, Tensor]:
    """Routing decisions in float32 (or better), never in a half dtype (§5b).

    Args:
        q_t, k_t: ``(G, p, N)``; r_t: landmarks ``(G, p, M)``.
        topk: routed keys per expert ``k' <= N``.
        rk, qr: the raw products ``r kᵀ`` ``(G, M, N)`` and ``q rᵀ`` ``(G, N, M)``
            when already computed in float32 or better (reused), else ``None``.

    Returns:
        ``key_idx (G, M, k')`` (§5.2, unsorted) and ``expert (G, N)`` (§5.4).
    """
    acc = torch.promote_types(q_t.dtype, torch.float32)
    with torch.no_grad(), torch.autocast(device_type=q_t.device.type, enabled=False):
        r32 = r_t.detach().to(acc).transpose(1, 2)
        if rk is None or rk.dtype != acc:
            rk = torch.bmm(r32, k_t.detach().to(acc))
        if qr is None or qr.dtype != acc:
            qr = torch.bmm(q_t.detach().to(acc).transpose(1, 2), r32.transpose(1, 2))
        key_idx = torch.topk(rk.detach(), topk, dim=-1, sorted=False).indices
        expert = qr.detach().argmax(dim=-1)
    return key_idx, expert


# ----------------------------------------------------------------------------- dense path
def _dense_core(q_t: Tensor, k_t: Tensor, v_t: Tensor, r_t: Tensor, rk: Optional[Tensor],
                qr: Optional[Tensor], idx: Tensor, routed: bool, scale: float
                ) -> Tuple[Tensor, ...]:
    """The mixture on all ``N`` keys at once, routed logits gathered (§5.3–5.5).

    Args:
        q_t, k_t, v_t: ``(G, p, N)``; r_t: landmarks ``(G, p, M)``.
        rk, qr: raw ``r kᵀ (G, M, N)`` and ``q rᵀ (G, N, M)`` (mixture only).
        idx: ``(G, N, k')`` routed keys of each query's expert.
        routed: no agent expert (``mode='routed'``).
        scale: ``1/√p``.

    Returns:
        ``out_t (G, p, N)`` and, for the backward, the softmax weights ``w``
        ``(G, N, [M +] k')``, the agent attention ``A (G, M, N)`` and agent values
        ``(G, p, M)`` (``None`` in routed mode).
    """
    dots = torch.bmm(q_t.transpose(1, 2), k_t)  # (G, N, N)
    logits = dots.gather(2, idx) * scale  # (G, N, k')
    attn = agent_v_t = None
    if routed:
        wts = _softmax(logits)
        w_routed = wts
    else:
        m = r_t.shape[2]
        attn = _softmax(rk * scale)  # §5.3 A = softmax_n(r_m·k_n/√p)  (G, M, N)
        agent_v_t = torch.bmm(v_t, attn.transpose(1, 2))  # (G, p, M)
        wts = _softmax(torch.cat((qr * (1.0 / r_t.shape[1]), logits), dim=2))
        w_routed = wts[..., m:]
    # without autograd the (G, N, N) buffer of the products is reused (fewer page faults)
    probs = dots.detach().zero_() if not torch.is_grad_enabled() else torch.zeros_like(dots)
    probs = probs.to(w_routed.dtype).scatter_(2, idx, w_routed)
    out_t = torch.bmm(v_t, probs.transpose(1, 2))
    if not routed:
        out_t = out_t.baddbmm_(agent_v_t, wts[..., :m].transpose(1, 2))
    return out_t, wts, attn, agent_v_t


class _DenseMiTA(torch.autograd.Function):
    """:func:`_dense_core` with a hand-written backward.

    Inputs ``q_t, k_t, v_t`` ``(G, p, N)`` contiguous; ``r_t`` ``(G, p, M)``,
    ``rk``, ``qr`` and ``idx`` are given detached: the landmark gradient
    (agent path) is added into ``∂q`` through the pooling (``pool_spec`` =
    ``(start, h, w, s_h, s_w)``).
    """

    @staticmethod
    def forward(ctx, q_t: Tensor, k_t: Tensor, v_t: Tensor, r_t: Tensor,
                rk: Optional[Tensor], qr: Optional[Tensor], idx: Tensor, routed: bool,
                scale: float, pool_spec: Tuple[int, ...]) -> Tensor:
        out_t, wts, attn, agent_v_t = _dense_core(q_t, k_t, v_t, r_t, rk, qr, idx, routed,
                                                  scale)
        ctx.save_for_backward(q_t, k_t, v_t, r_t, idx, wts, attn, agent_v_t)
        ctx.routed, ctx.scale, ctx.pool_spec = routed, scale, pool_spec
        return out_t

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q_t, k_t, v_t, r_t, idx, wts, attn, agent_v_t = ctx.saved_tensors
        routed, scale = ctx.routed, ctx.scale
        p = q_t.shape[1]
        m = 0 if routed else r_t.shape[2]
        grad_out = grad_out.contiguous()
        # out_t = v_t probsᵀ (+ agent_v_t w_aᵀ); one (G, N, N) buffer serves as ∂probs,
        # probs and ∂(q_tᵀ k_t) in turn (they share the sparsity pattern idx)
        buf = torch.bmm(grad_out.transpose(1, 2), v_t)  # ∂probs
        grad_w = buf.gather(2, idx)  # (G, N, k')
        probs = buf.zero_().scatter_(2, idx, wts[..., m:])
        grad_v = torch.bmm(grad_out, probs)  # (G, p, N)
        if not routed:
            grad_wa = torch.bmm(grad_out.transpose(1, 2), agent_v_t)  # (G, N, M)
            grad_agent_v = torch.bmm(grad_out, wts[..., :m])  # (G, p, M)
            grad_w = torch.cat((grad_wa, grad_w), dim=2)
        grad_logits = _softmax_backward(grad_w, wts)
        # routed logits = scale · (q_tᵀ k_t) gathered at idx; the gradient has the same
        # non-zero pattern as probs, whose buffer is reused
        grad_s = probs.scatter_(2, idx, grad_logits[..., m:] * scale)
        grad_q = torch.bmm(k_t, grad_s.transpose(1, 2))
        grad_k = torch.bmm(q_t, grad_s)
        if not routed:
            inv_p = 1.0 / p
            grad_la = grad_logits[..., :m]  # agent logits = q_tᵀ r_t / p
            grad_q.baddbmm_(r_t, grad_la.transpose(1, 2), alpha=inv_p)
            grad_r = torch.bmm(q_t, grad_la) * inv_p  # (G, p, M)
            # agent_v_t = v_t Aᵀ, A = softmax(scale · r_tᵀ k_t)
            grad_v.baddbmm_(grad_agent_v, attn)
            grad_rk = _softmax_backward(torch.bmm(grad_agent_v.transpose(1, 2), v_t), attn)
            grad_k.baddbmm_(r_t, grad_rk, alpha=scale)
            grad_r.baddbmm_(k_t, grad_rk.transpose(1, 2), alpha=scale)
            start, h, w, sh, sw = ctx.pool_spec
            _GridPool(start, (h, w), (sh, sw)).backward_into(grad_q, grad_r)
        return grad_q, grad_k, grad_v, None, None, None, None, None, None, None


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


def _grouped_core(q_t: Tensor, k_t: Tensor, v_t: Tensor, r_t: Tensor, rk: Optional[Tensor],
                  key_idx: Tensor, expert: Tensor, routed: bool, scale: float, block: int,
                  max_blocks: int) -> Tensor:
    """Same result as :func:`_dense_core`, queries grouped by expert (plain autograd).

    Args:
        q_t, k_t, v_t: ``(G, p, N)``; r_t: landmarks ``(G, p, M)``.
        rk: raw ``r kᵀ (G, M, N)`` (mixture only).
        key_idx: ``(G, M, k')``; expert: ``(G, N)``.
        routed, scale: as in :func:`_dense_core`.
        block, max_blocks: queries per block, blocks per SDPA call.

    Returns:
        ``out_t (G, p, N)``.
    """
    g, p, n = q_t.shape
    m, topk = r_t.shape[2], key_idx.shape[2]

    def rows(t: Tensor) -> Tensor:  # (G, p, N) -> (G·N, p) token rows
        return t.transpose(1, 2).reshape(g * n, p)

    k_rows, v_rows = rows(k_t), rows(v_t)
    with torch.no_grad():
        key_rows = (key_idx + torch.arange(g, device=q_t.device).view(g, 1, 1) * n).view(-1)
        slot_query, slot_valid, query_slot, block_expert = _expert_blocks(expert, m, block)
    # per-expert key/value tables (G·M, [M +] k', p): [landmarks / p ;] routed keys / √p
    keys = k_rows.index_select(0, key_rows).view(g, m, topk, p) * scale
    values = v_rows.index_select(0, key_rows).view(g, m, topk, p)
    if not routed:
        r = r_t.transpose(1, 2)  # (G, M, p)
        attn = _softmax(rk * scale)  # §5.3 shared expert
        agent_v = torch.bmm(attn, v_rows.view(g, n, p))  # (G, M, p)
        keys = torch.cat(((r * (1.0 / p)).unsqueeze(1).expand(g, m, m, p), keys), dim=2)
        values = torch.cat((agent_v.unsqueeze(1).expand(g, m, m, p), values), dim=2)
    keys, values = keys.reshape(g * m, -1, p), values.reshape(g * m, -1, p)
    # queries -> expert blocks (padding slots repeat query 0; their outputs are never
    # read back, so they touch neither the result nor any gradient)
    q_blk = _MoveRows.apply(rows(q_t), slot_query, query_slot, None)
    q_blk = q_blk.view(1, -1, block, p)  # blocks as "heads" (CPU flash kernel)
    keys = keys.index_select(0, block_expert).unsqueeze(0)  # (1, nb, [M +] k', p)
    values = values.index_select(0, block_expert).unsqueeze(0)
    out_blk = torch.cat([
        F.scaled_dot_product_attention(qc, kc, vc, scale=1.0) for qc, kc, vc in zip(
            q_blk.split(max_blocks, 1), keys.split(max_blocks, 1),
            values.split(max_blocks, 1))], dim=1)
    out = _MoveRows.apply(out_blk.reshape(-1, p), query_slot, slot_query, slot_valid)
    return out.view(g, n, p).transpose(1, 2)


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

    Execution paths (same result up to float rounding): ``'dense'`` gathers the
    routed logits from the full ``N × N`` logit matrix (no data-dependent shapes,
    ``O(N²)`` memory), ``'grouped'`` sorts queries by expert (``O(N)`` memory, a
    data-dependent block count). ``path='auto'`` takes ``'dense'`` for
    ``N <= dense_max_tokens`` (by default a cost model, see :meth:`use_dense`).
    Measured (fwd+bwd, C=384, H=6, M=k=25, 1 CPU thread, median of repeats on a
    shared 2-core machine, docs/benchmark_attention.md): at ``N = 197``, batch 8,
    MiTA takes 1.30× the time of ``MHSA`` (SDPA) on the dense path, 3.7× on the
    grouped one (3.5× before the dense path existed); at ``N = 4097``, batch 1, the
    grouped path takes 0.21× ``MHSA``.

    ``torch.compile``: the dense path has no data-dependent shapes and is captured
    as one graph (the hand-written backward included). The grouped path breaks the
    graph at its expert-block bookkeeping (:func:`_expert_blocks`, excluded from
    compilation with ``torch.compiler.disable``: the number of blocks depends on the
    routing); dynamo reports that break once per enclosing frame (3 breaks), the rest
    runs in compiled pieces. Checked with the inductor backend: forward and gradients
    equal eager to ~1e-6 (float32) on both paths.

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
        path: ``'auto'``, ``'dense'`` or ``'grouped'`` (see above; a speed and
            memory choice, the result does not depend on it).
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
            the token indices ``I_m`` each expert routes to — and ``last_hw_shape``
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
        g, scale, routed = b * heads, p ** -0.5, self.mode == 'routed'
        pool = _GridPool(start, (ph, pw), self.landmark_grid)
        dtype = _compute_dtype(x)
        fused = (torch.is_grad_enabled() and not torch.jit.is_tracing()
                 and not torch.jit.is_scripting())
        proj = self.in_proj
        with torch.autocast(device_type=x.device.type, enabled=False):
            x_in, x = x, x.to(dtype)
            w_in = proj.weight.to(dtype)
            b_in = None if proj.bias is None else proj.bias.to(dtype)
            parts = 4 if self.gate else 3
            # channels first: each of q, k, v (, g) is (B, C, N) -> heads (B·H, p, N)
            qkvg = (_InProj.apply(x, w_in, b_in, parts, heads) if fused
                    else _in_proj(x, w_in, b_in, parts, heads))
            q_t, k_t, v_t = qkvg[:3]
            dense = self.use_dense(n)
            plain = dense and not fused  # the dense math as plain autograd ops
            # §5.1 landmarks; their gradient (agent path only) is autograd's unless the
            # hand-written dense backward adds it itself
            with torch.set_grad_enabled(torch.is_grad_enabled() and not routed
                                        and (plain or not dense)):
                r_t = pool(q_t)
            rk = qr = None
            if not routed:  # the products the attention needs, reused by the routing
                with torch.set_grad_enabled(torch.is_grad_enabled() and (plain or not dense)):
                    rk = torch.bmm(r_t.transpose(1, 2), k_t)  # (G, M, N)
                    if dense:
                        qr = torch.bmm(q_t.transpose(1, 2), r_t)  # (G, N, M)
            acc = torch.promote_types(x_in.dtype, torch.float32)
            if dtype != acc:
                # §5b: reduced-precision attention routes on a float32 projection of the
                # input (rounding q and k first would flip near-tied decisions)
                with torch.no_grad():
                    q_r, k_r = _in_proj(
                        x_in.to(acc), proj.weight[:2 * c].to(acc),
                        None if proj.bias is None else proj.bias[:2 * c].to(acc), 2, heads)
                    key_idx, expert = _routing(q_r, k_r, pool(q_r), topk)
            else:
                key_idx, expert = _routing(q_t, k_t, r_t, topk, rk, qr)
            if dense:
                idx = key_idx.gather(1, expert.unsqueeze(-1).expand(g, n, topk))
                if plain:
                    out_t = _dense_core(q_t, k_t, v_t, r_t, rk, qr, idx, routed, scale)[0]
                else:
                    out_t = _DenseMiTA.apply(q_t, k_t, v_t, r_t.detach(), rk, qr, idx,
                                             routed, scale,
                                             (start, ph, pw) + self.landmark_grid)
            else:
                out_t = _grouped_core(q_t, k_t, v_t, r_t, rk, key_idx, expert, routed, scale,
                                      self.query_block_size, self.max_blocks_per_call)
            out_t = out_t.reshape(b, c, n)  # heads concatenated, channels first
            if self.dwc is not None:
                # +DWC: 3×3 depth-wise conv of the patch-token values, prefix gets 0
                npre = n - hw[0] * hw[1]
                v_img = qkvg[2].view(b, c, n)[:, :, npre:].unflatten(2, hw)
                local = F.conv2d(v_img, self.dwc.weight.to(dtype), self.dwc.bias.to(dtype)
                                 if self.dwc.bias is not None else None, padding=1,
                                 groups=c).flatten(2)
                out_t = torch.cat((out_t[:, :, :npre], out_t[:, :, npre:] + local), dim=2)
            if self.gate:
                out_t = out_t * F.silu(qkvg[3].view(b, c, n))
            w_out = self.proj.weight.to(dtype)
            b_out = None if self.proj.bias is None else self.proj.bias.to(dtype)
            y = F.linear(out_t.transpose(1, 2), w_out, b_out)
        if self.record_attention:
            self.last_expert = expert.detach().view(b, heads, n)
            self.last_routed_keys = key_idx.detach().view(b, heads, m, topk)
            self.last_hw_shape = (ph, pw) if hw is None else hw
        return self.proj_drop(y)
