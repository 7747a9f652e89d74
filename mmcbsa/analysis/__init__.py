"""Looking inside the models (docs/mechanisms.md §9) and counting their cost.

* :func:`coding_rate`, :func:`sparsity` — the compression measurements;
* :class:`AttentionCapture` — projections, attention maps and ISTA outputs of every
  layer from one forward pass (hooks; :data:`MECHANISMS` is the per-class table);
* :func:`measure_compression` — per-layer coding rate / sparsity over images;
* :mod:`.zero_shot` — emergent segmentation from attention maps, scored by mmseg's
  ``IoUMetric``;
* :mod:`.perturb` — Gaussian weight noise and DEPICT's orthogonal transforms;
* :class:`CodingRateHook` — an mmengine hook logging the coding rate during training;
* :func:`model_complexity` — parameters and FLOPs.
"""
from .capture import MECHANISMS, AttentionCapture, LayerRecord, Mechanism, TensorRecord
from .coding_rate import coding_rate, sparsity
from .complexity import model_complexity, sdpa_flop_jit
from .hooks import CodingRateHook
from .measure import LayerCompression, compression_scalars, measure_compression
from .perturb import orthogonal_transform_, perturb_parameters_, random_orthogonal
from .zero_shot import (binary_ground_truth, cls_foreground, label_clusters_by_majority,
                        mass_threshold_mask, score_binary_masks)

__all__ = [
    'coding_rate', 'sparsity', 'AttentionCapture', 'LayerRecord', 'TensorRecord',
    'Mechanism', 'MECHANISMS', 'measure_compression', 'LayerCompression',
    'compression_scalars', 'mass_threshold_mask', 'cls_foreground', 'binary_ground_truth',
    'label_clusters_by_majority', 'score_binary_masks', 'perturb_parameters_',
    'orthogonal_transform_', 'random_orthogonal', 'CodingRateHook', 'model_complexity',
    'sdpa_flop_jit'
]
