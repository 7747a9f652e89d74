"""Coding rate and sparsity of token features (docs/mechanisms.md §9; CRATE / CBSA).

The two numbers the white-box papers track through the layers:

* the **coding rate** of a layer's token features, summed over the heads — a layer of a
  compression-style model (MSSA, CBSA, TSSA, DEPICT) should lower it;
* the **sparsity** of the ISTA output — the fraction of exact zeros after its ReLU.
"""
import torch
from torch import Tensor

__all__ = ['coding_rate', 'sparsity']


def coding_rate(z: Tensor, num_heads: int, eps: float = 0.01) -> Tensor:
    """Per-image coding rate of token features, summed over heads.

    With ``z`` split into ``H = num_heads`` heads of width ``p = C / H``, for each image
    and head ``Z_h ∈ R^{N×p}``:

    ``R(Z_h) = ½ logdet(I_N + (p / (N·ε)) Z_h Z_hᵀ)``  and the result is ``Σ_h R(Z_h)``.

    ``ε`` is used exactly as the reference (CBSA repository ``coding_rate.py``) writes it:
    it plays the role of the usual ``ε²``. By Sylvester's identity
    ``logdet(I_N + c Z Zᵀ) = logdet(I_p + c Zᵀ Z)``, the smaller of the two Gram
    matrices is factorised (``min(N, p)³`` work), by a Cholesky factorisation of the
    symmetric positive definite ``I + c G`` in float64.

    Args:
        z: token features ``(B, N, C)`` (e.g. the attention input projection ``x Uᵀ``).
        num_heads: number of heads ``H``; ``C`` must be divisible by it.
        eps: the distortion ``ε`` (default 0.01, the reference value).

    Returns:
        ``(B,)`` float64 tensor on ``z``'s device.
    """
    if z.dim() != 3:
        raise ValueError(f'coding_rate: z must be (B, N, C), got shape {tuple(z.shape)}')
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f'coding_rate: num_heads must be a positive integer, got {num_heads!r}')
    if not eps > 0:
        raise ValueError(f'coding_rate: eps must be positive, got {eps!r}')
    b, n, c = z.shape
    if c % num_heads:
        raise ValueError(f'coding_rate: the width C={c} is not divisible by num_heads={num_heads}')
    if n == 0:
        raise ValueError('coding_rate: z has no tokens (N = 0)')
    p = c // num_heads
    zh = z.detach().to(torch.float64).reshape(b, n, num_heads, p).transpose(1, 2)  # (B,H,N,p)
    scale = p / (n * eps)
    # Gram matrix of the smaller side: (B, H, p, p) or (B, H, N, N)
    gram = zh.transpose(-2, -1) @ zh if p <= n else zh @ zh.transpose(-2, -1)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    mat = eye + scale * gram
    chol, info = torch.linalg.cholesky_ex(mat)
    if bool((info == 0).all()):
        logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    else:  # not expected for I + c·G (SPD); fall back on the general routine
        logdet = torch.linalg.slogdet(mat)[1]
    return 0.5 * logdet.sum(-1)  # (B,)


def sparsity(t: Tensor, per_sample: bool = False) -> Tensor:
    """Fraction of entries of ``t`` that are exactly zero.

    CRATE's figures plot ``1 − sparsity`` (the ℓ0 ratio ``‖Z‖₀ / (N·d)``) per ISTA layer;
    this returns the fraction of zeros itself.

    Args:
        t: any tensor; with ``per_sample=True`` its first axis is the batch.
        per_sample: one value per sample (``(B,)``) instead of one for the whole tensor.

    Returns:
        a float64 scalar tensor, or ``(B,)`` with ``per_sample=True``.
    """
    zeros = (t.detach() == 0)
    if per_sample:
        if t.dim() == 0:
            raise ValueError('sparsity: per_sample=True needs a batch axis')
        return zeros.reshape(t.shape[0], -1).to(torch.float64).mean(1)
    if t.numel() == 0:
        raise ValueError('sparsity: empty tensor')
    return zeros.to(torch.float64).mean()
