"""Looking inside the models (docs/mechanisms.md §9) and counting their cost.

* :func:`coding_rate`, :func:`sparsity` — the compression measurements;
* :class:`AttentionCapture` — projections, attention maps and ISTA outputs of every
  layer from one forward pass (hooks; :data:`MECHANISMS` is the per-class table);
* :func:`measure_compression` — per-layer coding rate / sparsity over images;
* :mod:`.zero_shot` — emergent segmentation from attention maps, scored by mmseg's
  ``IoUMetric``;
* :mod:`.perturb` — Gaussian weight noise and DEPICT's orthogonal transforms;
* :class:`CodingRateHook` — an mmengine hook logging the coding rate during training;
* :func:`model_complexity` — parameters and FLOPs (``tools/analysis_tools/get_flops.py``).
"""
from .capture import MECHANISMS, AttentionCapture, LayerRecord, Mechanism, TensorRecord
from .coding_rate import coding_rate, sparsity
from .complexity import (EXTRA_OP_HANDLES, FLOPS_CONVENTION, NO_MAC_OPS, baddbmm_flop_jit,
                         build_model_from_config, flop_analyzer, input_shape_from_config,
                         matmul_flop_jit, model_complexity, native_mha_flop_jit, sdpa_flop_jit)
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
    'orthogonal_transform_', 'random_orthogonal', 'CodingRateHook', 'EXTRA_OP_HANDLES',
    'FLOPS_CONVENTION', 'NO_MAC_OPS', 'baddbmm_flop_jit', 'build_model_from_config',
    'flop_analyzer', 'input_shape_from_config', 'matmul_flop_jit', 'model_complexity',
    'native_mha_flop_jit', 'sdpa_flop_jit'
]
