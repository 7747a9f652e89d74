"""CBSA's extract / contract / broadcast (docs/mechanisms.md §1.3–1.5) as Triton kernels.

Why it exists: on a GPU the PyTorch path of :class:`mmcbsa.models.attentions.CBSA` is
some fifteen small kernels per layer forward and twenty backward (GEMMs, softmaxes, casts
and element-wise steps, each reading and writing the ``(B, H, m, N)`` extraction map),
so at the token counts of the configs (1,024 tokens at 512²) CBT is bound by kernel
launches, not by arithmetic. Here the whole core is three kernels forward and three
backward, and the ``m × N`` map is never stored: it is recomputed from the
representatives and the log-sum-exp of its rows, as flash attention does:

forward, per group ``g = (b, h)`` (``w (N, p)``, ``R0 (m, p)``, scale ``s = 1/√p``):

1. ``_extract_fwd`` (grid ``G × S`` token splits): online-softmax partials of
   ``A = softmax_tokens(s R0 wᵀ)`` and ``A w`` over each split;
2. ``_contract_fwd`` (grid ``G``): merges the splits into the row log-sum-exp ``ℓ`` and
   ``A w``, then ``R = R0 + α_rep A w`` and ``Δ = softmax(s R Rᵀ) R`` (``m × m``, in
   registers);
3. ``_broadcast_fwd`` (grid ``G × N/BN``): ``o_n = α_x Σ_r exp(s R0_r·w_n − ℓ_r) Δ_r``,
   written straight into the ``(B, N, H·p)`` layout of the output projection.

backward, with ``Γ = A ∂o`` and ``D_r = Σ_n A_rn ∂A_rn = α_x Δ_r·Γ_r + ∂(Aw)_r·(Aw)_r``
(so the softmax backward needs no second pass over the tokens):

1. ``_gamma_bwd`` (grid ``G × S``): split partials of ``Γ``;
2. ``_contract_bwd`` (grid ``G``): ``∂α_x``, the ``m × m`` contraction backward,
   ``∂R0`` (direct part), ``∂α_rep``, ``∂(Aw) = α_rep ∂R`` and ``D``;
3. ``_tokens_bwd`` (grid ``G × S``): per token block ``∂A = α_x Δ ∂oᵀ + ∂(Aw) wᵀ``,
   ``∂S = A ⊙ (∂A − D)``, writes ``∂w = Aᵀ ∂(Aw) + s ∂Sᵀ R0`` and accumulates
   ``∂R0 += s ∂S w`` per split.

Every reduction over tokens goes through per-split buffers summed afterwards: results
do not depend on the launch order (no atomics). Dot products take the input dtype
(bfloat16/float16 under autocast, float32 in IEEE precision, no TF32) and accumulate in
float32; softmax statistics are float32. The representatives' pooling, the projections and
the reductions of the per-split buffers stay PyTorch operators.

Sizes: any ``N``, ``m`` and ``p`` (padded to powers of two ≥ 16 inside the kernels;
registers limit ``m`` and ``p`` to 128 each, checked by :func:`supported`).

Entry point :func:`contract_broadcast` (autograd Function). CUDA tensors run the compiled
kernels; CPU tensors run the same kernels in Triton's interpreter (slow: for tests).
Measured ratios against the PyTorch path: docs/benchmark_attention.md ("CUDA").
"""
import math
import os
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

    class tl:  # noqa: N801  (only the kernels' annotations read it)
        constexpr = None

__all__ = ['available', 'supported', 'contract_broadcast', 'MAX_WIDTH']

MAX_WIDTH = 128  # largest m and p (each padded to a power of two) the kernels hold
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available() -> bool:
    """Whether Triton can be imported (the kernels themselves compile at first use)."""
    return triton is not None


def supported(num_reps: int, head_dims: int, dtype: torch.dtype,
              device: torch.device) -> Optional[str]:
    """``None`` when the kernels handle these sizes, dtype and device, else the reason."""
    if triton is None:
        return 'Triton (not installed)'
    if device.type != 'cuda' and not interpreting():
        return (f'a CUDA input (got {device.type}; CPU inputs run only in Triton\'s '
                'interpreter, TRITON_INTERPRET=1)')
    if dtype not in DTYPES:
        return f'float32, bfloat16 or float16 computation (got {dtype})'
    if num_reps > MAX_WIDTH or head_dims > MAX_WIDTH:
        return (f'num_reps <= {MAX_WIDTH} and head_dims <= {MAX_WIDTH} '
                f'(got {num_reps} and {head_dims})')
    if (device.type == 'cuda' and dtype == torch.float32
            and max(_pow2(num_reps), _pow2(head_dims)) > 64):
        # the float32 backward kernel's tiles would need ~290 KB of shared memory
        return (f'bfloat16/float16 computation when num_reps or head_dims exceeds 64 '
                f'(got {num_reps} and {head_dims} in float32)')
    return None


# ----------------------------------------------------------------------------- kernels
# Plain functions, wrapped by :func:`_kernel` as compiled (CUDA) or interpreted (CPU)
# Triton kernels. Names: G groups (b, h), H heads, M representatives (MP padded), P head
# width (PP padded), BN tokens per block; W/DO/OUT/DW are (B, N, H·P) token-major,
# R0 is (B, M, H·P) with arbitrary strides (stride 0 over B: shared learned reps).


def _extract_fwd(W, R0, PART_M, PART_L, PART_ACC, N, H, M, P, tokens_per_split, num_splits,
                 stride_wb, stride_wn, stride_rb, stride_rm, stride_rc, scale,
                 MP: tl.constexpr, PP: tl.constexpr, BN: tl.constexpr,
                 PREC: tl.constexpr, DOT: tl.constexpr):
    g = tl.program_id(0)
    s = tl.program_id(1)
    b = g // H
    h = g % H
    rm = tl.arange(0, MP)
    rp = tl.arange(0, PP)
    rn = tl.arange(0, BN)
    pmask = rp < P
    r0 = tl.load(R0 + b * stride_rb + rm[:, None] * stride_rm + (h * P + rp)[None, :] * stride_rc,
                 mask=(rm[:, None] < M) & pmask[None, :], other=0.0)
    w_base = W + b * stride_wb + h * P
    m_i = tl.full([MP], -1.0e30, tl.float32)
    l_i = tl.zeros([MP], tl.float32)
    acc = tl.zeros([MP, PP], tl.float32)
    start = s * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    for n0 in range(start, end, BN):
        n = n0 + rn
        nmask = n < end
        w = tl.load(w_base + n[:, None] * stride_wn + rp[None, :],
                    mask=nmask[:, None] & pmask[None, :], other=0.0)
        sc = tl.dot(r0.to(DOT), tl.trans(w).to(DOT), input_precision=PREC) * scale
        sc = tl.where(nmask[None, :], sc, float('-inf'))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp(m_i - m_new)
        pr = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, 1)
        acc = acc * alpha[:, None] + tl.dot(pr.to(w.dtype).to(DOT), w.to(DOT), input_precision=PREC)
        m_i = m_new
    off = g * num_splits + s
    tl.store(PART_M + off * MP + rm, m_i)
    tl.store(PART_L + off * MP + rm, l_i)
    tl.store(PART_ACC + off * MP * PP + rm[:, None] * PP + rp[None, :], acc)


def _contract_fwd(PART_M, PART_L, PART_ACC, R0, STEP_REP, LSE, AW, DELTA, H, M, P,
                  num_splits, stride_rb, stride_rm, stride_rc, scale,
                  MP: tl.constexpr, PP: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr):
    g = tl.program_id(0)
    b = g // H
    h = g % H
    rm = tl.arange(0, MP)
    rp = tl.arange(0, PP)
    valid = (rm[:, None] < M) & (rp[None, :] < P)
    # merge the token splits: ℓ = log Σ_s l_s e^{m_s}, A w = Σ_s acc_s e^{m_s - ℓ}
    mx = tl.full([MP], -1.0e30, tl.float32)
    for s in range(0, num_splits):
        mx = tl.maximum(mx, tl.load(PART_M + (g * num_splits + s) * MP + rm))
    tot = tl.zeros([MP], tl.float32)
    acc = tl.zeros([MP, PP], tl.float32)
    for s in range(0, num_splits):
        off = g * num_splits + s
        c = tl.exp(tl.load(PART_M + off * MP + rm) - mx)
        tot += tl.load(PART_L + off * MP + rm) * c
        acc += tl.load(PART_ACC + off * MP * PP + rm[:, None] * PP + rp[None, :]) * c[:, None]
    aw = acc / tot[:, None]
    r0 = tl.load(R0 + b * stride_rb + rm[:, None] * stride_rm + (h * P + rp)[None, :] * stride_rc,
                 mask=valid, other=0.0)
    a_rep = tl.load(STEP_REP + h)
    reps = tl.where(valid, r0.to(tl.float32) + a_rep * aw, 0.0)
    rd = reps.to(r0.dtype)
    # contract: Δ = softmax(s R Rᵀ) R among the m representatives
    lg = tl.dot(rd.to(DOT), tl.trans(rd).to(DOT), input_precision=PREC) * scale
    lg = tl.where(rm[None, :] < M, lg, float('-inf'))
    e = tl.exp(lg - tl.max(lg, 1)[:, None])
    q = e / tl.sum(e, 1)[:, None]
    delta = tl.dot(q.to(r0.dtype).to(DOT), rd.to(DOT), input_precision=PREC)
    tl.store(LSE + g * MP + rm, mx + tl.log(tot))
    tl.store(AW + g * MP * PP + rm[:, None] * PP + rp[None, :], aw)
    tl.store(DELTA + g * MP * PP + rm[:, None] * PP + rp[None, :], delta)


def _broadcast_fwd(W, R0, LSE, DELTA, STEP_X, OUT, N, H, M, P, stride_wb, stride_wn,
                   stride_rb, stride_rm, stride_rc, stride_ob, stride_on, scale,
                   MP: tl.constexpr, PP: tl.constexpr, BN: tl.constexpr,
                   PREC: tl.constexpr, DOT: tl.constexpr):
    g = tl.program_id(0)
    blk = tl.program_id(1)
    b = g // H
    h = g % H
    rm = tl.arange(0, MP)
    rp = tl.arange(0, PP)
    n = blk * BN + tl.arange(0, BN)
    pmask = rp < P
    nmask = n < N
    w = tl.load(W + b * stride_wb + n[:, None] * stride_wn + (h * P + rp)[None, :],
                mask=nmask[:, None] & pmask[None, :], other=0.0)
    r0 = tl.load(R0 + b * stride_rb + rm[:, None] * stride_rm + (h * P + rp)[None, :] * stride_rc,
                 mask=(rm[:, None] < M) & pmask[None, :], other=0.0)
    lse = tl.load(LSE + g * MP + rm)
    sc = tl.dot(w.to(DOT), tl.trans(r0).to(DOT), input_precision=PREC) * scale  # (BN, MP)
    a = tl.where(rm[None, :] < M, tl.exp(sc - lse[None, :]), 0.0)  # Aᵀ of the block
    delta = tl.load(DELTA + g * MP * PP + rm[:, None] * PP + rp[None, :]) * tl.load(STEP_X + h)
    o = tl.dot(a.to(w.dtype).to(DOT), delta.to(w.dtype).to(DOT), input_precision=PREC)
    tl.store(OUT + b * stride_ob + n[:, None] * stride_on + (h * P + rp)[None, :],
             o.to(OUT.dtype.element_ty), mask=nmask[:, None] & pmask[None, :])


def _gamma_bwd(W, DO, R0, LSE, PART_G, N, H, M, P, tokens_per_split, num_splits,
               stride_wb, stride_wn, stride_rb, stride_rm, stride_rc, scale,
               MP: tl.constexpr, PP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
               DOT: tl.constexpr):
    g = tl.program_id(0)
    s = tl.program_id(1)
    b = g // H
    h = g % H
    rm = tl.arange(0, MP)
    rp = tl.arange(0, PP)
    rn = tl.arange(0, BN)
    pmask = rp < P
    r0 = tl.load(R0 + b * stride_rb + rm[:, None] * stride_rm + (h * P + rp)[None, :] * stride_rc,
                 mask=(rm[:, None] < M) & pmask[None, :], other=0.0)
    lse = tl.load(LSE + g * MP + rm)
    acc = tl.zeros([MP, PP], tl.float32)
    start = s * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    for n0 in range(start, end, BN):
        n = n0 + rn
        tmask = (n < end)[:, None] & pmask[None, :]
        offs = b * stride_wb + n[:, None] * stride_wn + (h * P + rp)[None, :]
        w = tl.load(W + offs, mask=tmask, other=0.0)
        do = tl.load(DO + offs, mask=tmask, other=0.0)
        sc = tl.dot(r0.to(DOT), tl.trans(w).to(DOT), input_precision=PREC) * scale
        a = tl.where((n < end)[None, :], tl.exp(sc - lse[:, None]), 0.0)
        acc += tl.dot(a.to(w.dtype).to(DOT), do.to(DOT), input_precision=PREC)
    tl.store(PART_G + (g * num_splits + s) * MP * PP + rm[:, None] * PP + rp[None, :], acc)


def _contract_bwd(PART_G, R0, STEP_REP, STEP_X, AW, DELTA, DAW, DVEC, DR0, DSTEP, H, M, P,
                  num_splits, stride_rb, stride_rm, stride_rc, scale,
                  MP: tl.constexpr, PP: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr):
    g = tl.program_id(0)
    b = g // H
    h = g % H
    rm = tl.arange(0, MP)
    rp = tl.arange(0, PP)
    valid = (rm[:, None] < M) & (rp[None, :] < P)
    blk = rm[:, None] * PP + rp[None, :]
    gam = tl.zeros([MP, PP], tl.float32)
    for s in range(0, num_splits):
        gam += tl.load(PART_G + (g * num_splits + s) * MP * PP + blk)
    gam = tl.where(valid, gam, 0.0)  # Γ = A ∂o (padding rows are not representatives)
    aw = tl.load(AW + g * MP * PP + blk)
    delta = tl.load(DELTA + g * MP * PP + blk)
    a_rep = tl.load(STEP_REP + h)
    a_x = tl.load(STEP_X + h)
    r0 = tl.load(R0 + b * stride_rb + rm[:, None] * stride_rm + (h * P + rp)[None, :] * stride_rc,
                 mask=valid, other=0.0)
    dstep_x = tl.sum(tl.sum(delta * gam, 1), 0)
    d_delta = a_x * gam
    # contraction backward (Q and R recomputed)
    reps = tl.where(valid, r0.to(tl.float32) + a_rep * aw, 0.0)
    rd = reps.to(r0.dtype)
    lg = tl.dot(rd.to(DOT), tl.trans(rd).to(DOT), input_precision=PREC) * scale
    lg = tl.where(rm[None, :] < M, lg, float('-inf'))
    e = tl.exp(lg - tl.max(lg, 1)[:, None])
    q = tl.where(rm[:, None] < M, e / tl.sum(e, 1)[:, None], 0.0)
    dd = d_delta.to(r0.dtype)
    dq = tl.dot(dd.to(DOT), tl.trans(rd).to(DOT), input_precision=PREC)
    d_reps = tl.dot(tl.trans(q).to(r0.dtype).to(DOT), dd.to(DOT), input_precision=PREC)
    dl = q * (dq - tl.sum(dq * q, 1)[:, None]) * scale
    d_reps += tl.dot((dl + tl.trans(dl)).to(r0.dtype).to(DOT), rd.to(DOT), input_precision=PREC)
    d_reps = tl.where(valid, d_reps, 0.0)
    dstep_rep = tl.sum(tl.sum(d_reps * aw, 1), 0)
    daw = a_rep * d_reps
    dvec = tl.sum(d_delta * delta, 1) + tl.sum(daw * aw, 1)
    tl.store(DAW + g * MP * PP + blk, daw)
    tl.store(DVEC + g * MP + rm, dvec)
    tl.store(DR0 + g * MP * PP + blk, d_reps)
    tl.store(DSTEP + g * 2, dstep_rep)
    tl.store(DSTEP + g * 2 + 1, dstep_x)


def _tokens_bwd(W, DO, R0, LSE, DELTA, STEP_X, DAW, DVEC, DW, PART_DR0, N, H, M, P,
                tokens_per_split, num_splits, stride_wb, stride_wn, stride_rb, stride_rm,
                stride_rc, scale, MP: tl.constexpr, PP: tl.constexpr, BN: tl.constexpr,
                PREC: tl.constexpr, DOT: tl.constexpr):
    g = tl.program_id(0)
    s = tl.program_id(1)
    b = g // H
    h = g % H
    rm = tl.arange(0, MP)
    rp = tl.arange(0, PP)
    rn = tl.arange(0, BN)
    pmask = rp < P
    blk = rm[:, None] * PP + rp[None, :]
    r0 = tl.load(R0 + b * stride_rb + rm[:, None] * stride_rm + (h * P + rp)[None, :] * stride_rc,
                 mask=(rm[:, None] < M) & pmask[None, :], other=0.0)
    dt = r0.dtype
    lse = tl.load(LSE + g * MP + rm)
    dlt = (tl.load(DELTA + g * MP * PP + blk) * tl.load(STEP_X + h)).to(dt)  # α_x Δ
    daw = tl.load(DAW + g * MP * PP + blk).to(dt)
    dvec = tl.load(DVEC + g * MP + rm)
    acc = tl.zeros([MP, PP], tl.float32)
    start = s * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    for n0 in range(start, end, BN):
        n = n0 + rn
        tmask = (n < end)[:, None] & pmask[None, :]
        offs = b * stride_wb + n[:, None] * stride_wn + (h * P + rp)[None, :]
        w = tl.load(W + offs, mask=tmask, other=0.0)
        do = tl.load(DO + offs, mask=tmask, other=0.0)
        sc = tl.dot(r0.to(DOT), tl.trans(w).to(DOT), input_precision=PREC) * scale
        a = tl.where((n < end)[None, :] & (rm[:, None] < M), tl.exp(sc - lse[:, None]), 0.0)
        da = (tl.dot(dlt.to(DOT), tl.trans(do).to(DOT), input_precision=PREC)
              + tl.dot(daw.to(DOT), tl.trans(w).to(DOT), input_precision=PREC))
        ds = (a * (da - dvec[:, None])).to(dt)
        dw = (tl.dot(tl.trans(a.to(dt)).to(DOT), daw.to(DOT), input_precision=PREC)
              + tl.dot(tl.trans(ds).to(DOT), r0.to(DOT), input_precision=PREC) * scale)
        tl.store(DW + offs, dw.to(DW.dtype.element_ty), mask=tmask)
        acc += tl.dot(ds.to(DOT), w.to(DOT), input_precision=PREC) * scale
    tl.store(PART_DR0 + (g * num_splits + s) * MP * PP + blk, acc)


_FUNCS = dict(extract_fwd=_extract_fwd, contract_fwd=_contract_fwd,
              broadcast_fwd=_broadcast_fwd, gamma_bwd=_gamma_bwd,
              contract_bwd=_contract_bwd, tokens_bwd=_tokens_bwd)
_KERNELS: Dict[str, object] = {}


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, which
    must be set before Triton is first imported)."""
    return triton is not None and os.environ.get('TRITON_INTERPRET', '0') not in ('', '0')


def _kernel(name: str):
    """The kernel ``name`` (compiled for CUDA, or interpreted: :func:`interpreting`)."""
    if name not in _KERNELS:
        _KERNELS[name] = triton.jit(_FUNCS[name])
    return _KERNELS[name]


# ----------------------------------------------------------------------------- launching
_SM_COUNT: Dict[int, int] = {}
_TL_DTYPES = {} if triton is None else {
    torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _target_programs(device: torch.device) -> int:
    """About two programs per streaming multiprocessor (4 under the interpreter)."""
    if device.type != 'cuda':
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 2 * _SM_COUNT[idx]


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


class _Launch:
    """Sizes, padded widths, token splits and launch options of one call."""

    def __init__(self, w: Tensor, r0: Tensor, heads: int) -> None:
        b, n, c = w.shape
        self.b, self.n, self.heads, self.p = b, n, heads, c // heads
        self.m = r0.shape[1]
        self.groups = b * heads
        self.mp, self.pp = _pow2(self.m), _pow2(self.p)
        self.bn = 64 if max(self.mp, self.pp) <= 64 else 32
        self.interpret = w.device.type != 'cuda'
        blocks = triton.cdiv(n, self.bn)
        splits = min(blocks, max(1, triton.cdiv(_target_programs(w.device), self.groups)))
        self.tokens_per_split = triton.cdiv(blocks, splits) * self.bn
        self.splits = triton.cdiv(n, self.tokens_per_split)
        self.prec = 'ieee' if w.dtype == torch.float32 else 'tf32'
        # Triton's interpreter multiplies bfloat16 as integers: it gets float32 operands
        # (the same products: a half-precision product is exact in float32)
        self.dot = tl.float32 if self.interpret else _TL_DTYPES[w.dtype]
        self.warps = 4 if max(self.mp, self.pp) <= 64 else 8
        self.r_strides = tuple(r0.stride())

    def run(self, name: str, grid: Tuple[int, ...], *args, **const) -> None:
        opts = {} if self.interpret else dict(num_warps=self.warps)
        _kernel(name)[grid](*args, MP=self.mp, PP=self.pp, PREC=self.prec, DOT=self.dot,
                            **const, **opts)


def _forward(w: Tensor, r0: Tensor, step_rep: Tensor, step_x: Tensor,
             heads: int, scale: float) -> Tuple[Tensor, ...]:
    L = _Launch(w, r0, heads)
    f32 = dict(device=w.device, dtype=torch.float32)
    g, s, mp, pp = L.groups, L.splits, L.mp, L.pp
    part_m, part_l = torch.empty(g, s, mp, **f32), torch.empty(g, s, mp, **f32)
    part_acc = torch.empty(g, s, mp, pp, **f32)
    L.run('extract_fwd', (g, s), w, r0, part_m, part_l, part_acc, L.n, heads, L.m, L.p,
          L.tokens_per_split, s, w.stride(0), w.stride(1), *L.r_strides, scale, BN=L.bn)
    lse = torch.empty(g, mp, **f32)
    aw, delta = torch.empty(g, mp, pp, **f32), torch.empty(g, mp, pp, **f32)
    L.run('contract_fwd', (g, ), part_m, part_l, part_acc, r0, step_rep, lse, aw, delta, heads,
          L.m, L.p, s, *L.r_strides, scale)
    out = torch.empty_like(w)
    L.run('broadcast_fwd', (g, triton.cdiv(L.n, L.bn)), w, r0, lse, delta, step_x, out, L.n,
          heads, L.m, L.p, w.stride(0), w.stride(1), *L.r_strides, out.stride(0),
          out.stride(1), scale, BN=L.bn)
    return out, lse, aw, delta


def _backward(grad_out: Tensor, w: Tensor, r0: Tensor, step_rep: Tensor, step_x: Tensor,
              lse: Tensor, aw: Tensor, delta: Tensor, heads: int,
              scale: float) -> Tuple[Tensor, ...]:
    L = _Launch(w, r0, heads)
    f32 = dict(device=w.device, dtype=torch.float32)
    g, s, mp, pp = L.groups, L.splits, L.mp, L.pp
    part_g = torch.empty(g, s, mp, pp, **f32)
    L.run('gamma_bwd', (g, s), w, grad_out, r0, lse, part_g, L.n, heads, L.m, L.p,
          L.tokens_per_split, s, w.stride(0), w.stride(1), *L.r_strides, scale, BN=L.bn)
    daw, d_r0 = torch.empty(g, mp, pp, **f32), torch.empty(g, mp, pp, **f32)
    dvec, dstep = torch.empty(g, mp, **f32), torch.empty(g, 2, **f32)
    L.run('contract_bwd', (g, ), part_g, r0, step_rep, step_x, aw, delta, daw, dvec, d_r0,
          dstep, heads, L.m, L.p, s, *L.r_strides, scale)
    grad_w = torch.empty_like(w)
    part_dr0 = torch.empty(g, s, mp, pp, **f32)
    L.run('tokens_bwd', (g, s), w, grad_out, r0, lse, delta, step_x, daw, dvec, grad_w,
          part_dr0, L.n, heads, L.m, L.p, L.tokens_per_split, s, w.stride(0), w.stride(1),
          *L.r_strides, scale, BN=L.bn)
    d_r0 = (d_r0 + part_dr0.sum(1))[:, :L.m, :L.p]  # (G, m, p) -> (B, m, H·p)
    grad_r0 = d_r0.view(L.b, heads, L.m, L.p).transpose(1, 2).reshape(L.b, L.m, heads * L.p)
    dstep = dstep.view(L.b, heads, 2).sum(0)
    return grad_w, grad_r0.to(r0.dtype), dstep[:, 0], dstep[:, 1]


class _ContractBroadcastTriton(torch.autograd.Function):

    @staticmethod
    def forward(ctx, w: Tensor, r0: Tensor, step_rep: Tensor, step_x: Tensor, heads: int,
                scale: float) -> Tensor:
        sr, sx = step_rep.detach().float().contiguous(), step_x.detach().float().contiguous()
        out, lse, aw, delta = _forward(w, r0, sr, sx, heads, scale)
        ctx.save_for_backward(w, r0, sr, sx, lse, aw, delta)
        ctx.heads, ctx.scale = heads, scale
        ctx.step_dtype = step_rep.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        w, r0, sr, sx, lse, aw, delta = ctx.saved_tensors
        grad_w, grad_r0, d_rep, d_x = _backward(grad_out.contiguous(), w, r0, sr, sx, lse, aw,
                                                delta, ctx.heads, ctx.scale)
        return (grad_w, grad_r0, d_rep.to(ctx.step_dtype), d_x.to(ctx.step_dtype), None, None)


def contract_broadcast(w: Tensor, r0: Tensor, step_rep: Tensor, step_x: Tensor, heads: int,
                       scale: Optional[float] = None) -> Tensor:
    """CBSA's core (docs/mechanisms.md §1.3–1.5) for all heads at once.

    Args:
        w: ``(B, N, H·p)`` token-major ``x Uᵀ`` (contiguous), the compute dtype.
        r0: ``(B, m, H·p)`` representatives of each sample (any strides; an expanded
            ``(m, H·p)`` parameter for learned representatives), same dtype as ``w``.
        step_rep, step_x: ``(H,)`` step sizes ``α_rep``, ``α_x``.
        heads: ``H``.
        scale: logit scale, default ``1/√p``.

    Returns:
        ``o (B, N, H·p)``, ``o_n = α_x Σ_r A_rn Δ_r`` per head, differentiable in ``w``,
        ``r0`` and both step sizes.
    """
    p = w.shape[2] // heads
    if scale is None:
        scale = 1.0 / math.sqrt(p)
    why = supported(r0.shape[1], p, w.dtype, w.device)
    if why is not None:
        raise ValueError(f'CBSA Triton kernels need {why}')
    if r0.dtype != w.dtype:
        raise ValueError(f'CBSA Triton kernels: r0 dtype {r0.dtype} differs from w {w.dtype}')
    return _ContractBroadcastTriton.apply(w.contiguous(), r0, step_rep, step_x, heads,
                                          float(scale))
