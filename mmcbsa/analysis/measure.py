"""Per-layer compression statistics of a model over a few images (docs/mechanisms.md §9).

Shared by ``tools/analysis_tools/coding_rate.py`` and :class:`~.hooks.CodingRateHook`:
one forward pass per batch under :class:`~.capture.AttentionCapture`, then the coding
rate of every attention call's input projection and the sparsity of the ISTA output of
the same block.
"""
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch.nn as nn

from .capture import AttentionCapture, LayerRecord, TensorRecord, layer_labels
from .coding_rate import coding_rate, sparsity
from .runtime import forward_tensor

__all__ = ['LayerCompression', 'measure_compression', 'compression_scalars']


@dataclass
class LayerCompression:
    """Coding rate (and ISTA sparsity) of one attention layer over the images seen.

    Attributes:
        label: ``'<group>.<i>'``: the ``i``-th attention call (from 0) in the model's
            top-level part ``group`` (``backbone``, ``decode_head``, ``head``).
        name: module path; ``type``: class name; ``num_heads``, ``num_tokens``.
        coding_rate: per-image ``Σ_h R(Z_h)`` of the attention input projection.
        sparsity: per-image fraction of zeros of the ISTA output of the same block
            (empty when the block has no ISTA).
        ista_name: module path of that ISTA, or ``None``.
    """
    label: str
    name: str
    type: str
    num_heads: int
    num_tokens: int
    coding_rate: List[float] = field(default_factory=list)
    sparsity: List[float] = field(default_factory=list)
    ista_name: Optional[str] = None

    @staticmethod
    def _stats(values: List[float]):
        if not values:
            return float('nan'), float('nan')
        arr = np.asarray(values, dtype=np.float64)
        return float(arr.mean()), float(arr.std())

    @property
    def coding_rate_mean_std(self):
        """(mean, standard deviation over images, ``ddof=0``)."""
        return self._stats(self.coding_rate)

    @property
    def sparsity_mean_std(self):
        """(mean, standard deviation over images); NaN without ISTA."""
        return self._stats(self.sparsity)


def _ista_owner(ista: TensorRecord, records: List[LayerRecord]) -> Optional[int]:
    """Index of the attention call in the same block as ``ista`` (its parent module
    holds both), or ``None``."""
    parent = ista.name.rsplit('.', 1)[0] + '.' if '.' in ista.name else ''
    for i, rec in enumerate(records):
        if rec.name.startswith(parent):
            return i
    return None


def measure_compression(model: nn.Module, batches: Iterable[dict],
                        eps: float = 0.01) -> List[LayerCompression]:
    """Per-layer coding rate and ISTA sparsity of ``model`` on ``batches``.

    Args:
        model: an mmseg segmentor or mmpretrain classifier (eval mode is the caller's).
        batches: dataloader batches (``{'inputs': [...], 'data_samples': [...]}``).
        eps: ``ε`` of :func:`~.coding_rate.coding_rate`.

    Returns:
        one :class:`LayerCompression` per attention call, in forward order.
    """
    layers: Dict[str, LayerCompression] = {}
    with AttentionCapture(model, projections=True, maps=False, ista=True) as cap:
        for batch in batches:
            cap.clear()
            forward_tensor(model, batch)
            records = cap.layers
            for label, rec in zip(layer_labels(records), records):
                if rec.projection is None:
                    continue
                layer = layers.setdefault(label, LayerCompression(
                    label, rec.name, rec.type, rec.num_heads, rec.num_tokens))
                layer.coding_rate.extend(coding_rate(rec.projection, rec.num_heads,
                                                     eps).tolist())
            for ista in cap.ista:
                owner = _ista_owner(ista, records)
                if owner is None:
                    continue
                layer = layers.get(layer_labels(records)[owner])
                if layer is not None:
                    layer.ista_name = ista.name
                    layer.sparsity.extend(sparsity(ista.output, per_sample=True).tolist())
    return list(layers.values())


def compression_scalars(layers: List[LayerCompression]) -> Dict[str, float]:
    """``{'coding_rate/<label>': mean, 'sparsity/<label>': mean}`` (sparsity only where
    there is ISTA) — the scalars :class:`~.hooks.CodingRateHook` logs."""
    out = {}
    for layer in layers:
        out[f'coding_rate/{layer.label}'] = layer.coding_rate_mean_std[0]
        if layer.sparsity:
            out[f'sparsity/{layer.label}'] = layer.sparsity_mean_std[0]
    return out
