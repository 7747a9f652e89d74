"""Reading reference checkpoints (weights only) and writing converted ones.

The reference training scripts save the weights next to training state, read by
:func:`mmcbsa.engine.read_checkpoint`: the CBSA repository's classifiers ``{'epoch',
'arch', 'state_dict', 'best_acc1', 'optimizer', 'scheduler'}``; DeiT-style scripts
(MiTA-DeiT, Primal) ``{'model', 'optimizer', 'lr_scheduler', 'epoch', 'model_ema',
'scaler', 'args'}`` (``args`` an ``argparse.Namespace``, allowed here: rebuilding one
only sets attributes); Segmenter-style scripts (DEPICT, CBT segmentation) ``{'model',
'optimizer', 'n_cls', 'lr_scheduler', 'epoch'}``.
"""
import argparse
import os
import os.path as osp
from typing import Any, Mapping

import torch
from torch import Tensor

from mmcbsa.engine.weights import Checkpoint, read_checkpoint

__all__ = ['ConversionError', 'read_reference_checkpoint', 'save_converted']


class ConversionError(ValueError):
    """A checkpoint or option the converters refuse; the message is one line for the
    user, naming the file or option and the problem."""


def read_reference_checkpoint(path: str) -> Checkpoint:
    """:func:`mmcbsa.engine.read_checkpoint` with the training scripts' ``args`` allowed;
    its refusals as :class:`ConversionError`."""
    try:
        return read_checkpoint(path, [argparse.Namespace])
    except ValueError as e:
        raise ConversionError(str(e)) from None


def save_converted(state_dict: Mapping[str, Tensor], dst: str, src: str, **meta: Any) -> None:
    """Write ``{'state_dict', 'meta': {'converted_from': basename(src), **meta}}``
    (``meta`` plain values only: the file stays loadable ``weights_only``) to ``dst``,
    which ``mmengine.runner.load_checkpoint`` reads."""
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    torch.save(dict(state_dict=dict(state_dict),
                    meta=dict(converted_from=osp.basename(src), **meta)), dst)
