"""mmpretrain image classifier that adds the KSVD regulariser of Primal-Attention
layers to the task loss (docs/mechanisms.md §6.4)."""
from typing import List

import torch
from mmpretrain.models.classifiers import ImageClassifier
from mmpretrain.structures import DataSample

from mmcbsa.models.attentions.primal import PrimalAttention, collect_ksvd_loss
from mmcbsa.registry import register_model


@register_model(scopes=('mmpretrain', ))
class KSVDImageClassifier(ImageClassifier):
    """``ImageClassifier`` whose loss dict gains ``loss_ksvd = η · L_ksvd``.

    ``L_ksvd`` is the mean over the backbone's Primal-Attention layers of
    ``(L_e + L_r − trace)²`` from the forward pass that produced the task loss
    (docs/mechanisms.md §6.4); the total loss mmengine optimises is the sum of the dict, i.e.
    ``task loss + η · L_ksvd``. Without Primal-Attention layers the dict is exactly
    ``ImageClassifier``'s (no ``loss_ksvd`` key).

    Args:
        ksvd_weight: ``η`` (0.05 for Primal.+DeiT-S).
        Other arguments: as :class:`mmpretrain.models.ImageClassifier`.
    """

    def __init__(self, *args, ksvd_weight: float = 0.05, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if ksvd_weight < 0:
            raise ValueError(f'KSVDImageClassifier: ksvd_weight must be >= 0, '
                             f'got {ksvd_weight}')
        self.ksvd_weight = ksvd_weight

    def loss(self, inputs: torch.Tensor, data_samples: List[DataSample]) -> dict:
        losses = super().loss(inputs, data_samples)
        if self.has_ksvd_layers:
            # the layers' KSVD terms of the forward pass that produced `losses`
            losses['loss_ksvd'] = self.ksvd_weight * collect_ksvd_loss(self.backbone)
        return losses

    @property
    def has_ksvd_layers(self) -> bool:
        """Whether the backbone contains Primal-Attention layers."""
        return any(isinstance(m, PrimalAttention) for m in self.backbone.modules())
