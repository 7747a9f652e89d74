"""Parameter perturbations of the DEPICT robustness experiments (docs/mechanisms.md §9).

* :func:`perturb_parameters_` — add ``N(0, σ²)`` noise to every parameter of a part of
  the model (seeded);
* :func:`orthogonal_transform_` — replace ``U`` of every tied-projection MSSA layer
  (DEPICT heads) by ``Q U`` with a random orthogonal ``Q`` (whole, ``Q ∈ O(Hp)``), or
  ``U_h`` by ``Q_h U_h`` per head (``Q_h ∈ O(p)``).

What the compression view predicts for the orthogonal transforms. A tied MSSA layer is
``w = LN(x) Uᵀ``, ``o_h = softmax(w_h w_hᵀ/√p) w_h``, ``y = γ Σ_h o_h U_h`` — a gradient
step on the coding rate ``Σ_h R(U_h z)``, which depends on each ``U_h`` only through its
row space. Per head, ``U_h → Q_h U_h`` gives ``w_h → w_h Q_hᵀ``: the attention
``w_h w_hᵀ`` is unchanged, ``o_h → o_h Q_hᵀ`` and ``o_h Q_hᵀ Q_h U_h = o_h U_h``, so the
layer computes exactly the same function (the tied output projection undoes the
rotation; an untied ``Linear`` output, as in CRATE's MSSA, would not). The same holds
for DEPICT-CA's cross-attention layers (queries and keys rotate together). A whole
``Q ∈ O(Hp)`` mixes the heads: the union of the subspaces (the row space of ``U``) and
the rate of all heads taken together are preserved, but each head's subspace changes,
so ``Σ_h R(U_h z)`` and the layer change — no invariance is predicted (except ``H = 1``),
and the metric drop measures how much the trained head relies on its particular
subspaces.
"""
import re
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ['SCOPES', 'ORTHOGONAL_MODES', 'scope_parameters', 'perturb_parameters_',
           'random_orthogonal', 'tied_mssa_layers', 'orthogonal_transform_']

SCOPES = ('head', 'backbone', 'all')
ORTHOGONAL_MODES = ('whole', 'per_head')
_HEADS = ('decode_head', 'auxiliary_head', 'head')


def _scope_modules(model: nn.Module, scope: str) -> List[Tuple[str, nn.Module]]:
    if scope not in SCOPES:
        raise ValueError(f'scope must be one of {SCOPES}, got {scope!r}')
    if scope == 'all':
        return [('', model)]
    names = ('backbone', ) if scope == 'backbone' else _HEADS
    found = [(n, getattr(model, n)) for n in names
             if isinstance(getattr(model, n, None), nn.Module)]
    if not found:
        raise ValueError(f'scope={scope!r}: the model ({type(model).__name__}) has none of '
                         f'the attributes {names}')
    return found


def scope_parameters(model: nn.Module, scope: str,
                     pattern: Optional[str] = None) -> Iterator[Tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of ``scope``: ``'head'`` (``decode_head`` /
    ``auxiliary_head`` of a segmentor, ``head`` of a classifier), ``'backbone'``, or
    ``'all'`` (every parameter, necks included); with ``pattern``, only the parameters whose
    full name matches that regular expression (``re.search``, e.g. ``'in_proj'``).

    Args:
        model: the model.
        scope: ``'head'``, ``'backbone'`` or ``'all'``.
        pattern: optional regular expression on the full parameter names.
    """
    regex = None
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f'parameter pattern {pattern!r} is not a regular expression: '
                             f'{err}') from None
    for prefix, module in _scope_modules(model, scope):
        for name, param in module.named_parameters():
            full = f'{prefix}.{name}' if prefix else name
            if regex is None or regex.search(full):
                yield full, param


@torch.no_grad()
def perturb_parameters_(model: nn.Module, sigma: float, scope: str = 'all',
                        generator: torch.Generator = None,
                        pattern: Optional[str] = None) -> int:
    """Add ``N(0, σ²)`` to every floating-point parameter of ``scope``, in place.

    The noise is drawn on the CPU from ``generator`` (same numbers on every device),
    parameter by parameter in ``named_parameters`` order. Buffers (BatchNorm statistics)
    are left alone.

    Args:
        model: the model.
        sigma: standard deviation ``σ >= 0`` (absolute, the same for every parameter).
        scope: see :func:`scope_parameters`.
        generator: a seeded ``torch.Generator`` (CPU).
        pattern: only the parameters whose name matches (see :func:`scope_parameters`).

    Returns:
        the number of perturbed scalars.
    """
    if not sigma >= 0:
        raise ValueError(f'sigma must be >= 0, got {sigma!r}')
    count = 0
    for _, param in scope_parameters(model, scope, pattern):
        if not param.is_floating_point():
            continue
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        param.add_(noise.to(param.device, param.dtype), alpha=float(sigma))
        count += param.numel()
    return count


def random_orthogonal(n: int, generator: torch.Generator = None,
                      dtype: torch.dtype = torch.float64) -> Tensor:
    """A Haar-random ``n × n`` orthogonal matrix (QR of a Gaussian matrix with the signs
    of ``R``'s diagonal moved into ``Q``), drawn on the CPU.

    Args:
        n: size.
        generator: a seeded CPU ``torch.Generator`` (or ``None``: the global one).
        dtype: dtype of the result.
    """
    if n <= 0:
        raise ValueError(f'random_orthogonal: n must be positive, got {n}')
    g = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return (q * signs).to(dtype)


def tied_mssa_layers(model: nn.Module, scope: str = 'head') -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of the MSSA layers with a tied projection (DEPICT) in ``scope``
    (see :func:`scope_parameters`)."""
    layers = []
    for prefix, module in _scope_modules(model, scope):
        for name, m in module.named_modules():
            if type(m).__name__ == 'MSSA' and getattr(m, 'out_proj_mode', None) == 'tied':
                layers.append((f'{prefix}.{name}'.strip('.'), m))
    return layers


@torch.no_grad()
def orthogonal_transform_(model: nn.Module, mode: str, scope: str = 'head',
                          generator: torch.Generator = None) -> int:
    """Rotate ``U`` (``in_proj.weight``, ``(H·p, d)``) of every tied MSSA layer in place:
    ``'whole'``: ``U ← Q U`` with ``Q ∈ O(H·p)``; ``'per_head'``: ``U_h ← Q_h U_h`` with
    ``Q_h ∈ O(p)`` per head (a block-diagonal ``Q``). One independent ``Q`` per layer.

    Args:
        model: the model.
        mode: ``'whole'`` or ``'per_head'``.
        scope: where the layers are looked for (see :func:`scope_parameters`).
        generator: a seeded CPU ``torch.Generator``.

    Returns:
        the number of layers transformed; ``ValueError`` when there is none.
    """
    if mode not in ORTHOGONAL_MODES:
        raise ValueError(f'orthogonal mode must be one of {ORTHOGONAL_MODES}, got {mode!r}')
    layers = tied_mssa_layers(model, scope)
    if not layers:
        raise ValueError('orthogonal transforms need tied-projection MSSA layers (a DEPICT '
                         f'decode head) in scope={scope!r}; the model has none')
    for _, layer in layers:
        u = layer.in_proj.weight
        heads, p = layer.num_heads, layer.head_dims
        if mode == 'whole':
            q = random_orthogonal(heads * p, generator)
        else:
            q = torch.block_diag(*[random_orthogonal(p, generator) for _ in range(heads)])
        u.copy_((q @ u.double().cpu()).to(u.device, u.dtype))
    return len(layers)
