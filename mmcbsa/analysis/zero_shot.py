"""Emergent (zero-shot) segmentation from attention maps (docs/mechanisms.md §9).

Two readings of a layer's attention, neither uses a decoder or labels:

* **mass threshold** (CRATE / DINO protocol): per head, keep the smallest set of patches
  that holds a fraction ``τ`` (0.6) of the query row's attention mass; the union over
  heads is the foreground (:func:`mass_threshold_mask`, :func:`cls_foreground`);
* **clustering** (CBSA): every patch takes the label of the representative that extracts
  it most, ``argmax_r A[r, n]`` — a partition into ``m`` parts (MiTA's expert per token and
  TSSA's ``argmax_h π`` are partitions too). A partition has no notion of foreground;
  it is scored after labelling each part foreground when most of its (non-ignored)
  ground-truth pixels are foreground (:func:`label_clusters_by_majority`). That labelling
  looks at the ground truth, so it measures how well the parts follow object boundaries
  (an upper bound of what a labelling of those parts can reach), not a prediction; any
  fine enough partition scores well this way, so it is compared with a regular grid of
  as many blocks labelled the same way (:func:`grid_partition`).

Scores are mmseg's ``IoUMetric`` on two classes, background (0) and foreground (1),
:func:`score_binary_masks`.
"""
import math
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from mmseg.evaluation import IoUMetric
from torch import Tensor

__all__ = ['mass_threshold_mask', 'cls_foreground', 'grid_to_image', 'binary_ground_truth',
           'label_clusters_by_majority', 'grid_partition', 'score_binary_masks',
           'BINARY_CLASSES']

BINARY_CLASSES = ('background', 'foreground')


def mass_threshold_mask(maps: Tensor, tau: float = 0.6) -> Tensor:
    """Smallest set of positions holding a fraction ``tau`` of each map's mass.

    Each map is normalised to sum 1; positions are taken in decreasing order of value
    while the mass taken so far is below ``tau`` (the DINO / CRATE rule).

    Args:
        maps: non-negative ``(..., h, w)`` maps (e.g. a CLS row per head).
        tau: mass fraction in ``(0, 1]``.

    Returns:
        bool ``(..., h, w)``.
    """
    if not 0 < tau <= 1:
        raise ValueError(f'tau must be in (0, 1], got {tau!r}')
    flat = maps.flatten(-2).to(torch.float64)
    if (flat < 0).any():
        raise ValueError('mass_threshold_mask: maps must be non-negative')
    flat = flat / flat.sum(-1, keepdim=True).clamp_min(1e-300)
    vals, order = flat.sort(-1, descending=True)
    before = vals.cumsum(-1) - vals  # mass of the larger positions
    keep_sorted = before < tau
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.view(maps.shape)


def cls_foreground(maps: Tensor, tau: float = 0.6) -> Tensor:
    """Foreground of one layer: union over heads of :func:`mass_threshold_mask`.

    Args:
        maps: ``(B, H, h, w)`` query-row maps (or ``(B, H, 1, h, w)``).
        tau: mass fraction.

    Returns:
        bool ``(B, h, w)``.
    """
    if maps.dim() == 5:
        maps = maps.squeeze(2)
    return mass_threshold_mask(maps, tau).any(1)


def grid_to_image(grid: Tensor, input_shape: Sequence[int], img_shape: Sequence[int],
                  ori_shape: Sequence[int]) -> Tensor:
    """A patch-grid label map ``(h, w)`` -> the original image ``ori_shape``.

    The grid covers the (padded) network input ``input_shape``: each cell is repeated
    over its ``P × P`` patch (when the input tiles into patches exactly or with
    bottom/right padding, as in mmseg's ViT), else stretched (nearest); the part that
    covers the image (``img_shape``, before padding) is kept and resized (nearest) to
    ``ori_shape`` — where mmseg evaluates.

    Args:
        grid: ``(h, w)`` values on the patch grid (labels or map values).
        input_shape: ``(H_in, W_in)`` of the network input the grid covers.
        img_shape: ``(H, W)`` of the image inside that input (before padding).
        ori_shape: ``(H_o, W_o)`` to resize to.

    Returns:
        ``(H_o, W_o)``, ``grid``'s dtype.
    """
    h, w = grid.shape[-2:]
    in_h, in_w = int(input_shape[0]), int(input_shape[1])
    ph, pw = -(-in_h // h), -(-in_w // w)
    g = grid.reshape(1, 1, h, w).float()
    if -(-in_h // ph) == h and -(-in_w // pw) == w:
        big = g.repeat_interleave(ph, -2).repeat_interleave(pw, -1)[..., :in_h, :in_w]
    else:
        big = F.interpolate(g, size=(in_h, in_w), mode='nearest')
    big = big[..., :int(img_shape[0]), :int(img_shape[1])]
    out = F.interpolate(big, size=(int(ori_shape[0]), int(ori_shape[1])), mode='nearest')
    return out[0, 0].to(grid.dtype)


def binary_ground_truth(labels: Tensor, background: Optional[Iterable[int]] = None,
                        ignore_index: int = 255) -> Tensor:
    """Foreground (1) / background (0) ground truth; ``ignore_index`` stays.

    Args:
        labels: ``(H, W)`` class indices.
        background: class indices that are background; ``None``: the image's most
            frequent (non-ignored) class.
        ignore_index: the label that is not scored.
    """
    labels = labels.long()
    valid = labels != ignore_index
    if background is None:
        if valid.any():
            background = [int(torch.mode(labels[valid]).values)]
        else:
            background = []
    bg = torch.zeros_like(valid)
    for c in background:
        bg |= labels == int(c)
    out = torch.where(bg, 0, 1)
    return torch.where(valid, out, torch.full_like(out, ignore_index))


def label_clusters_by_majority(clusters: Tensor, gt: Tensor,
                               ignore_index: int = 255) -> Tensor:
    """Foreground mask from a partition: a part is foreground when more than half of
    its non-ignored ground-truth pixels are foreground (ties: background).

    Args:
        clusters: ``(H, W)`` integer part labels (at the ground truth's resolution).
        gt: ``(H, W)`` binary ground truth (0 / 1 / ``ignore_index``).

    Returns:
        ``(H, W)`` long, 0 / 1.
    """
    shape = clusters.shape
    if gt.shape != shape:
        raise ValueError(f'label_clusters_by_majority: clusters {tuple(shape)} and ground '
                         f'truth {tuple(gt.shape)} differ in size')
    flat, gt = clusters.long().flatten(), gt.long().flatten()
    valid = gt != ignore_index
    ids, inverse = torch.unique(flat, return_inverse=True)
    zeros = torch.zeros(len(ids), dtype=torch.float64, device=flat.device)
    fg = zeros.index_add(0, inverse[valid], (gt[valid] == 1).double())
    total = zeros.index_add(0, inverse[valid], valid[valid].double())
    return (fg * 2 > total)[inverse].long().view(shape)


def grid_partition(h: int, w: int, parts: int) -> Tensor:
    """A regular partition of an ``h × w`` patch grid into about ``parts`` blocks
    (``s_h × s_w`` cells following the grid's aspect, the cells of adaptive pooling):
    the reference partition a clustering with ``parts`` parts is compared with.

    Args:
        h, w: patch grid.
        parts: number of blocks wanted (about ``s_h · s_w``).

    Returns:
        ``(h, w)`` long block labels.
    """
    if parts <= 0:
        raise ValueError(f'grid_partition: parts must be positive, got {parts}')
    s_h = min(h, max(1, round(math.sqrt(parts * h / w))))
    s_w = min(w, max(1, -(-parts // s_h)))
    rows = torch.arange(h) * s_h // h
    cols = torch.arange(w) * s_w // w
    return rows[:, None] * s_w + cols[None, :]


def score_binary_masks(preds: Sequence[Tensor], gts: Sequence[Tensor],
                       ignore_index: int = 255) -> Dict[str, float]:
    """Score foreground masks with mmseg's ``IoUMetric`` (classes background /
    foreground).

    Args:
        preds: ``(H, W)`` 0 / 1 predictions, one per image.
        gts: ``(H, W)`` 0 / 1 / ``ignore_index`` ground truths, same sizes.

    Returns:
        ``{'IoU.background', 'IoU.foreground', 'mIoU', 'aAcc'}`` in percent.
    """
    if len(preds) != len(gts) or not preds:
        raise ValueError(f'score_binary_masks: need as many predictions as ground truths '
                         f'(> 0), got {len(preds)} and {len(gts)}')
    metric = IoUMetric(iou_metrics=['mIoU'], ignore_index=ignore_index, prefix='zero_shot')
    metric.dataset_meta = dict(classes=BINARY_CLASSES)
    metric.process({}, [dict(pred_sem_seg=dict(data=p.long()[None]),
                             gt_sem_seg=dict(data=g.long()[None]))
                        for p, g in zip(preds, gts)])
    totals = [sum(r[i] for r in metric.results) for i in range(4)]
    res = IoUMetric.total_area_to_metrics(*totals, ['mIoU'])
    iou = np.asarray(res['IoU'], dtype=np.float64) * 100
    return {'IoU.background': float(iou[0]), 'IoU.foreground': float(iou[1]),
            'mIoU': float(np.nanmean(iou)), 'aAcc': float(res['aAcc']) * 100}
