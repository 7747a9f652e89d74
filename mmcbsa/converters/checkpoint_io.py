"""Reading reference checkpoints (weights only) and writing converted ones.

A reference checkpoint is a parameter dict, possibly wrapped in ``{'model': ...}`` /
``{'state_dict': ...}`` next to training state, with DataParallel's ``module.`` prefix:
the CBSA repository's classifiers save ``{'epoch', 'arch', 'state_dict', 'best_acc1',
'optimizer', 'scheduler'}``; DeiT-style scripts (MiTA-DeiT, Primal) ``{'model',
'optimizer', 'lr_scheduler', 'epoch', 'model_ema', 'scaler', 'args'}`` (``args`` an
``argparse.Namespace``, allowed: rebuilding one only sets attributes); Segmenter-style
scripts (DEPICT, CBT segmentation) ``{'model', 'optimizer', 'n_cls', 'lr_scheduler',
'epoch'}``. Anything that is not weights-only (a pickled class, a function call) is
refused with :class:`ConversionError`, as are truncated or corrupt files.
"""
import argparse
import os
import os.path as osp
from typing import Any, Dict, List, Mapping, NamedTuple

import torch
from torch import Tensor

from mmcbsa.engine.weights import load_weights_only

__all__ = ['ConversionError', 'ReferenceCheckpoint', 'read_reference_checkpoint',
           'save_converted']

_WRAPPERS = ('model', 'state_dict')
_DP_PREFIX = 'module.'
# Classes (besides mmcbsa's allow-list, see mmcbsa.engine.safe_globals) that the
# training scripts' checkpoints hold next to the weights.
_EXTRA_SAFE_GLOBALS = [argparse.Namespace]


class ConversionError(ValueError):
    """A checkpoint or option the converters refuse; the message is one line for the
    user, naming the file or option and the problem."""


class ReferenceCheckpoint(NamedTuple):
    """What :func:`read_reference_checkpoint` found in a file.

    Attributes:
        state_dict: the parameters, ``module.`` stripped, on CPU.
        wrappers: the entries descended into to reach them, e.g. ``['model']``.
        stripped_prefix: number of keys that lost a leading ``module.``.
        extras: the other top-level entries of the outermost dict (``epoch``,
            ``optimizer``, ``args`` ...), untouched.
    """
    state_dict: Dict[str, Tensor]
    wrappers: List[str]
    stripped_prefix: int
    extras: Dict[str, Any]


def read_reference_checkpoint(path: str) -> ReferenceCheckpoint:
    """Load ``path`` weights-only, descend into ``'model'`` / ``'state_dict'`` while
    they hold dicts (``'model'`` first: DeiT's ``'model_ema'`` is not taken) and strip
    one leading ``module.`` from every key. :class:`ConversionError` for a missing,
    empty, corrupt or not weights-only file, or contents that are not a dict of tensors
    (naming the first offending entry)."""
    try:
        top = load_weights_only(path, _EXTRA_SAFE_GLOBALS)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if not isinstance(top, Mapping):
        raise ConversionError(f'{path} holds a {type(top).__name__}, not a dict of '
                              'parameters')
    wrappers: List[str] = []
    checkpoint = top
    while True:
        inner = next((k for k in _WRAPPERS if isinstance(checkpoint.get(k), Mapping)), None)
        if inner is None:
            break
        wrappers.append(inner)
        checkpoint = checkpoint[inner]
    extras = {k: v for k, v in top.items() if k != wrappers[0]} if wrappers else {}
    out: Dict[str, Tensor] = {}
    stripped = 0
    for key, value in checkpoint.items():
        if not isinstance(value, Tensor):
            where = ''.join(f'[{w!r}]' for w in wrappers)
            raise ConversionError(f'{path}: entry {where}[{key!r}] is a '
                                  f'{type(value).__name__}, not a tensor')
        if not isinstance(key, str):
            raise ConversionError(f'{path}: parameter name {key!r} is not a string')
        if key.startswith(_DP_PREFIX):
            key, stripped = key[len(_DP_PREFIX):], stripped + 1
        if key in out:
            raise ConversionError(f'{path}: parameter {key!r} appears twice (with and '
                                  f'without {_DP_PREFIX!r})')
        out[key] = value
    if not out:
        raise ConversionError(f'{path} holds no parameters')
    return ReferenceCheckpoint(out, wrappers, stripped, extras)


def save_converted(state_dict: Mapping[str, Tensor], dst: str, src: str, **meta: Any) -> None:
    """Write ``{'state_dict', 'meta': {'converted_from': basename(src), **meta}}``
    (``meta`` plain values only: the file stays loadable ``weights_only``) to ``dst``,
    which ``mmengine.runner.load_checkpoint`` reads."""
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    torch.save(dict(state_dict=dict(state_dict),
                    meta=dict(converted_from=osp.basename(src), **meta)), dst)
