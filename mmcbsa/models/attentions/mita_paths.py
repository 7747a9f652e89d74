"""MiTA's exact execution paths (the math of :class:`~mmcbsa.models.attentions.mita.MiTA`,
docs/mechanisms.md §5): the head layout, the landmark pooling (:class:`TokenPool`), the
routing (:func:`route`), and the dense, masked and grouped cores. The compiled CPU path
is :mod:`mmcbsa.ops.mita_cpu`. Which path runs is the module's choice (its ``path``).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import adaptive_avg_pool2d_any, is_exporting, softmax_backward, softmax_fp32


# ----------------------------------------------------------------------------- layout
def split_qkv_heads(y: Tensor, parts: int, heads: int, merged: Tuple[int, ...] = (),
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


class SplitQKVHeads(torch.autograd.Function):
    """:func:`split_qkv_heads` whose ``merged`` chunks are contiguous copies, with a
    backward that writes every chunk's gradient straight into the ``(B, N, parts·C')``
    layout of the projection (one pass; a head chunk and a merged copy of the same
    chunk add up), instead of autograd's zero-filled buffer per output."""

    @staticmethod
    def forward(ctx, y: Tensor, parts: int, heads: int, merged: Tuple[int, ...]):
        ctx.shape, ctx.parts, ctx.heads, ctx.merged = y.shape, parts, heads, merged
        out = split_qkv_heads(y, parts, heads, merged)
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


class TokenPool:
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
        if is_exporting():  # one graph for every grid size
            return adaptive_avg_pool2d_any(self._patches(t), self.grid, channels_last=True
                                           ).flatten(1, 2)
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
def route(q: Tensor, k: Tensor, r: Tensor, topk: int, rk: Optional[Tensor] = None,
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
def _dense_sample(q: Tensor, k: Tensor, v: Tensor, pool: TokenPool, topk: int,
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
        wts = w_routed = softmax_fp32(logits)
    else:
        m = r.shape[1]
        attn = softmax_fp32(rk * scale)  # §5.3 A = softmax_n(r_m·k_n/√p)  (H, M, N)
        agent_v = torch.bmm(attn, v)  # (H, M, p)
        wts = softmax_fp32(torch.cat((qr * (1.0 / p), logits), dim=2))
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


def dense_forward(y: Tensor, heads: int, head_dims: int, pool: TokenPool, topk: int,
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


class DenseMiTA(torch.autograd.Function):
    """:func:`dense_forward` with a hand-written backward, sample by sample (2
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
                heads: int, head_dims: int, pool: TokenPool, topk: int, routed: bool,
                merged: Tuple[int, ...]):
        b, n, _ = y.shape
        c = heads * head_dims
        routing = None if key_idx is None else (key_idx, expert)
        out, wts, r, attn, agent_v, key_idx, expert = dense_forward(
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
            grad_logits = softmax_backward(grad_w, w)
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
                grad_rk = softmax_backward(torch.bmm(grad_agent_v, v.transpose(1, 2)), a)
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
def masked_core(q: Tensor, k: Tensor, v: Tensor, pool: TokenPool, topk: int, routed: bool,
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
        key_idx, expert = route(q, k, r, topk)
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
def max_expert_blocks(num_tokens: int, num_experts: int, block: int) -> int:
    """The most blocks of ``block`` queries that :func:`expert_blocks` can need for one
    group of ``N`` queries and ``M`` experts, whatever the routing: with ``E`` experts
    holding ``c_e >= 1`` queries each, ``Σ_e ⌈c_e / T⌉ <= E + ⌊(N − E) / T⌋``, which
    grows with ``E <= min(M, N)``."""
    used = min(num_experts, num_tokens)
    return used + (num_tokens - used) // block


def expert_blocks(expert: Tensor, num_experts: int, block: int,
                  trim: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Group queries by expert into blocks of ``block`` slots, in a fixed number of blocks.

    The blocks of each group come first, expert by expert (an expert's last block
    padded); the rest, up to :func:`max_expert_blocks` per group, are padding blocks.
    Every size depends on ``(G, N, M, T)`` only, never on the routing: no host
    synchronisation, one ``torch.compile`` graph, CUDA-graph friendly.

    Args:
        expert: ``(G, N)`` expert id in ``[0, M)`` of every query of each group
            (a group is one ``(batch, head)`` pair).
        num_experts: ``M``.
        block: slots per block ``T``.
        trim: drop the padding blocks at the end (their number is read from the
            routing: a host read, for CPU eager execution only, where it costs nothing
            and the padding blocks cost up to 1.2× the fwd+bwd time).

    Returns:
        ``slot_query`` ``(nb*T,)``: flat query id ``g*N + n`` held by each slot
        (``0`` for the padding slots);
        ``slot_valid`` ``(nb*T,)``: bool, False for the padding slots;
        ``query_slot`` ``(G*N,)``: the slot of each flat query id;
        ``block_expert`` ``(nb,)``: flat expert id ``g*M + m`` of each block (any
        valid id for a padding block), with ``nb = G·max_expert_blocks(N, M, T)``.
    """
    g, n = expert.shape
    dev = expert.device
    flat = (expert + torch.arange(g, device=dev).unsqueeze(1) * num_experts).reshape(-1)
    order = torch.argsort(flat, stable=True)  # flat query ids, grouped by expert
    f_sorted = flat[order]
    bounds = torch.searchsorted(f_sorted, torch.arange(g * num_experts + 1, device=dev))
    seg_start, counts = bounds[:-1], bounds[1:] - bounds[:-1]  # queries per expert
    nblk = torch.div(counts + block - 1, block, rounding_mode='floor')  # blocks per expert
    blk_end = torch.cumsum(nblk, 0)
    num_blocks = int(blk_end[-1]) if trim else g * max_expert_blocks(n, num_experts, block)
    rank = torch.arange(g * n, device=dev) - seg_start[f_sorted]  # position in the expert
    slot = (blk_end[f_sorted] - nblk[f_sorted]
            + torch.div(rank, block, rounding_mode='floor')) * block + rank % block
    slot_query = torch.zeros(num_blocks * block, dtype=torch.long, device=dev).scatter_(
        0, slot, order)
    query_slot = torch.empty(g * n, dtype=torch.long, device=dev).scatter_(0, order, slot)
    # a slot is valid iff the query it holds is held there (padding slots hold query 0)
    slot_valid = query_slot[slot_query] == torch.arange(num_blocks * block, device=dev)
    block_expert = torch.searchsorted(blk_end, torch.arange(num_blocks, device=dev),
                                      right=True).clamp_(max=g * num_experts - 1)
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


def grouped_core(q: Tensor, k: Tensor, v: Tensor, r: Tensor, rk: Optional[Tensor],
                 key_idx: Tensor, expert: Tensor, routed: bool, scale: float, block: int,
                 max_blocks: int) -> Tensor:
    """Same result as :func:`_dense_sample`, queries grouped by expert into blocks of
    one expert (:func:`expert_blocks`; plain autograd). Each block attends to its
    expert's key table in one unmasked SDPA call (blocks as heads, flash-capable), every
    size fixed by ``(G, N, M, k', T)`` except on CPU eager, where the padding blocks
    are dropped.

    Args:
        q, k, v: ``(G, N, p)``; r: landmarks ``(G, M, p)``.
        rk: raw ``r kᵀ (G, M, N)`` (mixture only).
        key_idx: ``(G, M, k')``; expert: ``(G, N)``.
        routed, scale: as in :func:`_dense_sample`.
        block, max_blocks: queries per block, blocks per SDPA call.

    Returns:
        ``out (G, N, p)``.
    """
    g, n, p = q.shape
    m, topk = r.shape[1], key_idx.shape[2]
    k_rows, v_rows = k.reshape(g * n, p), v.reshape(g * n, p)  # token rows (views)
    with torch.no_grad():
        key_rows = (key_idx + torch.arange(g, device=q.device).view(g, 1, 1) * n).view(-1)
        trim = q.device.type == 'cpu' and not (torch.compiler.is_compiling()
                                               or torch.jit.is_tracing())
        slot_query, slot_valid, query_slot, block_expert = expert_blocks(expert, m, block,
                                                                         trim)
    # per-expert key/value tables (G·M, [M +] k', p): [landmarks / p ;] routed keys / √p
    keys = k_rows.index_select(0, key_rows).view(g, m, topk, p) * scale
    values = v_rows.index_select(0, key_rows).view(g, m, topk, p)
    if not routed:
        attn = softmax_fp32(rk * scale)  # §5.3 shared expert
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
