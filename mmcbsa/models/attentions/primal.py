"""Primal-Attention (NeurIPS 2023, arXiv 2305.19798; docs/mechanisms.md §6).

Self-attention as an asymmetric kernel SVD solved in the primal: the ``N × N``
attention matrix is never formed. The KSVD regulariser of each layer is kept on the
module after every forward (``module.ksvd_loss``) and summed up over a model with
:func:`collect_ksvd_loss`, so models add ``η · loss_ksvd`` to their task loss without
any change of the attention interface.
"""
import functools
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor

from mmcbsa.registry import register_model
from .base import (check_input_width, check_positive, is_compiling, is_exporting,
                   merge_heads, resolve_head_dims)


def linspace_positions(num_tokens: int, num_samples: int) -> Tuple[int, ...]:
    """The reference's ``torch.linspace(0, N - 1, n, dtype=torch.int64)`` in exact
    integer arithmetic (docs/mechanisms.md §6.2), as Python ints.

    What ATen computes for an integer ``linspace`` (CUDA, and CPU builds with FMA:
    AVX2 / AVX512): ``step = fl((N − 1) / (n − 1))`` in float64, then position
    ``i < n // 2`` is ``trunc(fl(step · i))`` and position ``i >= n // 2`` is
    ``trunc(fl(N − 1 − step · (n − 1 − i)))`` with *one* rounding (a fused
    multiply-add). Writing ``step = num / den`` exactly (``den`` a power of two), both
    are correctly rounded quotients of integers, which Python's ``int / int``
    computes exactly; no float arithmetic of the platform is involved, so the result
    is the same in eager code, under ``torch.compile`` (where the positions become
    constants of the graph; inductor's own ``linspace`` works in float32 and picks
    different positions, e.g. ``N = 257, n = 197``) and on every device.

    (ATen's CPU kernel built without FMA, ``ATEN_CPU_CAPABILITY=default``, rounds
    ``step · (n − 1 − i)`` first and so differs at rare exact ties, e.g.
    ``N = 3, n = 151``, position 75.)

    Args:
        num_tokens: ``N`` (>= 1).
        num_samples: ``n`` (>= 1).

    Returns:
        ``n`` non-decreasing positions in ``[0, N)``, every token when ``N == n``.
    """
    last = num_tokens - 1
    if num_samples == 1:
        return (0, )
    num, den = (last / (num_samples - 1)).as_integer_ratio()  # step, exactly
    half = num_samples // 2
    return tuple(int(num * i / den) if i < half
                 else int((last * den - num * (num_samples - 1 - i)) / den)
                 for i in range(num_samples))


_cached_positions = functools.lru_cache(maxsize=256)(linspace_positions)


def sample_positions(num_tokens: int, num_samples: int, device=None) -> Tensor:
    """``num_samples`` evenly spaced token positions in ``[0, num_tokens)`` as an
    int64 tensor (docs/mechanisms.md §6.2): :func:`linspace_positions`, cached in
    eager code and folded into constants under ``torch.compile``. ``num_tokens`` may be
    a traced size (``torch.jit.trace``, as mmengine's FLOP counter traces): the positions
    are a constant of each traced size."""
    if isinstance(num_tokens, torch.SymInt) and is_exporting():
        return traced_linspace_positions(num_tokens, int(num_samples), device)
    num_tokens, num_samples = int(num_tokens), int(num_samples)
    positions = (linspace_positions(num_tokens, num_samples) if is_compiling()
                 else _cached_positions(num_tokens, num_samples))
    return torch.tensor(positions, dtype=torch.int64, device=device)


def _two_product(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """``(p, e)`` with ``p = fl(a·b)`` and ``a·b = p + e`` exactly (float64, Dekker's
    product with Veltkamp's split; no fused multiply-add needed)."""
    def split(v):
        c = v * 134217729.0  # 2**27 + 1
        hi = c - (c - v)
        return hi, v - hi
    p = a * b
    (ah, al), (bh, bl) = split(a), split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def traced_linspace_positions(num_tokens, num_samples: int, device=None) -> Tensor:
    """:func:`linspace_positions` as tensor operations of a symbolic ``num_tokens``
    (exported graphs, docs/deployment.md): the same float64 steps, and the one rounding
    of ATen's fused ``N − 1 − step·j`` reproduced from the exact product
    (:func:`_two_product`) and the exact difference (Knuth's two-sum). Equal to
    :func:`linspace_positions` for every tested ``N`` and ``n`` (tests/test_primal.py).
    """
    f64 = dict(dtype=torch.float64, device=device)
    i = torch.arange(num_samples, **f64)
    if num_samples == 1:
        return i.long()
    last = torch.ones((), **f64) * (num_tokens - 1)
    step = last / (num_samples - 1)
    head = torch.trunc(step * i)  # i < n // 2
    p, e = _two_product(step, (num_samples - 1) - i)
    s = last - p  # two-sum: last - p = s + t exactly
    bb = s - last
    t = (last - (s - bb)) + (-p - bb)
    tail = torch.trunc(s + (t - e))  # i >= n // 2
    return torch.where(i < num_samples // 2, head, tail).long()


@register_model()
class PrimalAttention(BaseModule):
    """Primal-Attention with the KSVD regulariser (docs/mechanisms.md §6).

    For input ``x`` ``(B, N, C)`` (in a pre-norm block ``x = LN(X)``, the data used
    for the projections; docs/mechanisms.md §6.2), heads ``H`` of width ``p = C/H`` and rank ``s``:

    1. ``q, k = Linear_{C→2C}(x)`` per head, ``ℓ2``-normalised over ``p``;
    2. ``n`` evenly spaced positions of the runtime ``N`` (``n`` fixed at build time,
       ``n = min(num_tokens_train, s · rank_multi)``);
       ``W_e = x_h[idx]ᵀ W̃_e``, ``W_r = x_h[idx]ᵀ W̃_r`` ``(B, H, p, s)`` with learned
       ``W̃_e, W̃_r`` ``(H, n, s)``;
    3. ``e = q̂ W_e``, ``r = k̂ W_r`` ``(B, H, N, s)``;
       ``out_h = Linear_{2s→p}([e; r])`` (shared by the heads); heads concatenated;
       ``Linear_{C→C}``.
    4. KSVD loss of this layer (stored as ``self.ksvd_loss``, a scalar with graph):
       ``(L_e + L_r − T)²`` with ``L_e = mean_{b,h,n} ‖e ⊙ Λ_h‖² / 2`` (``L_r`` alike)
       and ``T = trace(mean_h W̃_eᵀ W̃_r)``.

    Args:
        embed_dims: token width ``C``.
        num_heads: heads ``H``.
        low_rank: rank ``s``. Default 20 (PrimalFormer; Primal.+DeiT-S uses 96).
        rank_multi: sampled positions per rank. Default 10.
        num_tokens_train: tokens ``N`` at the training resolution (prefix tokens
            included); with ``s·rank_multi`` it fixes ``n``. Default 197 (224², patch 16,
            CLS). Inputs of any other ``N`` are accepted.
        qk_bias: bias of the ``qk`` projection (reference models: True).
        proj_drop: dropout after the output projection.

    Shapes: ``x (B, N, C)`` -> ``(B, N, C)``; ``hw_shape`` is accepted and unused.
    """

    def __init__(self, embed_dims: int, num_heads: int, low_rank: int = 20,
                 rank_multi: int = 10, num_tokens_train: int = 197, qk_bias: bool = True,
                 proj_drop: float = 0., init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.head_dims = resolve_head_dims(embed_dims, num_heads, None, 'PrimalAttention')
        self.low_rank = check_positive(low_rank, 'low_rank', 'PrimalAttention')
        self.rank_multi = check_positive(rank_multi, 'rank_multi', 'PrimalAttention')
        self.num_tokens_train = check_positive(num_tokens_train, 'num_tokens_train',
                                               'PrimalAttention')
        self.embed_dims, self.num_heads = embed_dims, num_heads
        self.num_samples = min(num_tokens_train, low_rank * rank_multi)  # n
        self.qk = nn.Linear(embed_dims, 2 * embed_dims, bias=qk_bias)
        self.w_e = nn.Parameter(torch.empty(num_heads, self.num_samples, low_rank))  # W̃_e
        self.w_r = nn.Parameter(torch.empty(num_heads, self.num_samples, low_rank))  # W̃_r
        self.lambdas = nn.Parameter(torch.empty(num_heads, low_rank))  # Λ
        self.concat_proj = nn.Linear(2 * low_rank, self.head_dims)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_ksvd_parameters()
        self.ksvd_loss: Optional[Tensor] = None

    def reset_ksvd_parameters(self) -> None:
        """Orthogonal ``W̃_e``/``W̃_r`` (each head's ``n × s`` matrix), uniform ``Λ``."""
        with torch.no_grad():
            for w in (self.w_e, self.w_r):
                for head in w:
                    nn.init.orthogonal_(head)
            nn.init.uniform_(self.lambdas)

    def extra_repr(self) -> str:
        return (f'embed_dims={self.embed_dims}, num_heads={self.num_heads}, '
                f'low_rank={self.low_rank}, num_samples={self.num_samples}')

    def ksvd_terms(self, e: Tensor, r: Tensor) -> Dict[str, Tensor]:
        """The KSVD loss terms of docs/mechanisms.md §6.4 (scalars, at least float32).

        Args:
            e, r: ``(B, H, N, s)`` projection scores.
        """
        dtype = torch.promote_types(e.dtype, torch.float32)  # fp16/bf16 -> fp32
        lam = self.lambdas.to(dtype).view(1, self.num_heads, 1, self.low_rank)
        loss_e = (e.to(dtype) * lam).square().sum(-1).mean() / 2
        loss_r = (r.to(dtype) * lam).square().sum(-1).mean() / 2
        # trace(mean_h W̃_eᵀ W̃_r) = Σ_{h,n,s} W̃_e ⊙ W̃_r / H
        trace = (self.w_e.to(dtype) * self.w_r.to(dtype)).sum() / self.num_heads
        return dict(loss_e=loss_e, loss_r=loss_r, trace=trace,
                    loss_ksvd=(loss_e + loss_r - trace).square())

    def forward(self, x: Tensor, hw_shape: Optional[Sequence[int]] = None) -> Tensor:
        """``x (B, N, C)`` -> ``(B, N, C)``; stores ``self.ksvd_loss``."""
        check_input_width(x, self.embed_dims, 'PrimalAttention')
        b, n, c = x.shape
        heads, p = self.num_heads, self.head_dims
        qk = self.qk(x).view(b, n, 2, heads, p).permute(2, 0, 3, 1, 4)  # (2, B, H, N, p)
        q, k = F.normalize(qk[0], dim=-1), F.normalize(qk[1], dim=-1)  # §6.1 q̂, k̂
        # §6.2 data-dependent projections from the n sampled tokens of x
        x_s = x.index_select(1, sample_positions(n, self.num_samples, x.device))
        x_s = x_s.view(b, self.num_samples, heads, p)  # (B, n, H, p)
        w_e = torch.einsum('bjhp,hjs->bhps', x_s, self.w_e.to(x.dtype))  # (B, H, p, s)
        w_r = torch.einsum('bjhp,hjs->bhps', x_s, self.w_r.to(x.dtype))
        # §6.3 e = q̂ W_e, r = k̂ W_r; out_h = Linear_{2s→p}([e; r])
        e, r = torch.matmul(q, w_e), torch.matmul(k, w_r)  # (B, H, N, s)
        out = self.concat_proj(torch.cat((e, r), dim=-1))  # (B, H, N, p)
        if not is_exporting():  # a training term: not part of a deployed graph
            self.ksvd_loss = self.ksvd_terms(e, r)['loss_ksvd']
        return self.proj_drop(self.proj(merge_heads(out)))


def collect_ksvd_loss(model: nn.Module) -> Tensor:
    """KSVD loss of a model: the mean of ``(L_e + L_r − T)²`` over its
    :class:`PrimalAttention` layers (docs/mechanisms.md §6.4), from their latest forward.

    The total training loss is ``task loss + η · collect_ksvd_loss(model)``.

    Raises:
        ValueError: ``model`` has no PrimalAttention layer.
        RuntimeError: a PrimalAttention layer has not run a forward yet.
    """
    layers = [m for m in model.modules() if isinstance(m, PrimalAttention)]
    if not layers:
        raise ValueError('collect_ksvd_loss: the model has no PrimalAttention layer')
    if any(m.ksvd_loss is None for m in layers):
        raise RuntimeError('collect_ksvd_loss: run a forward pass before collecting the '
                           'KSVD loss')
    return torch.stack([m.ksvd_loss for m in layers]).mean()
