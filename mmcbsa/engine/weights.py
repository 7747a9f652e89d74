"""Does a checkpoint fit a model? One policy for the tools that load weights
(tools/test.py and the analysis tools): a checkpoint whose tensors do not match the
model's — keys missing, keys the model does not have, shapes that differ — is refused
with one line that counts them and names a few, instead of mmengine's ``strict=False``
load, which warns in the log and goes on with partly random weights. ``--allow-partial``
loads what fits, for the cases a researcher really wants (a decoder on another encoder,
a checkpoint of an older layout).

Checkpoints are read by :func:`read_checkpoint` on :func:`load_weights_only`
(``torch.load(weights_only=True)``; mmengine's metadata is allow-listed by importing
mmcbsa, :mod:`mmcbsa.engine.safe_globals`), the one reader of the tools and the
converters: it finds the weights in mmengine's and the reference training scripts'
layouts, and a missing, empty, truncated or corrupt file, one that is not weights-only
or one without weights is a one-line ``ValueError``.
"""
import os.path as osp
import pickle
import re
import warnings
import zipfile
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ['load_weights_only', 'Checkpoint', 'read_checkpoint', 'read_state_dict',
           'fit_problem', 'load_weights', 'check_weights', 'class_count_problem']

SHOWN = 3  # names listed per kind of problem


def _first_line(error: BaseException) -> str:
    return ' '.join(str(error).split('\n')[0].split()) or type(error).__name__


def load_weights_only(path: str, safe_globals: Sequence[type] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU (zip files memory-mapped: a large
    checkpoint is not read twice), with ``safe_globals`` allowed besides mmcbsa's
    allow-list.

    Raises:
        ValueError: one line naming ``path``: missing, not a file, empty, truncated or
            corrupt, or not weights-only (it names the class or function it needs).
    """
    if not osp.exists(path):
        raise ValueError(f'{path}: no such file')
    if not osp.isfile(path):
        raise ValueError(f'{path}: not a file')
    if osp.getsize(path) == 0:
        raise ValueError(f'{path} is empty (0 bytes): not a checkpoint')
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location='cpu', weights_only=True,
                              mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r'GLOBAL ([\w.]+)', str(e))
        if found:  # a class or function reference: arbitrary code on a plain unpickle
            raise ValueError(
                f'{path} is not a weights-only checkpoint: it needs {found.group(1)} to load, '
                'which is refused (unpickling it could run arbitrary code)') from None
        detail = re.search(r'WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)', str(e), re.S)
        detail = ' '.join(detail.group(1).split()) if detail else _first_line(e)
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError, TypeError,
            zipfile.BadZipFile) as e:
        detail = _first_line(e)
    raise ValueError(f'{path} is truncated or corrupt (not a readable torch checkpoint: '
                     f'{detail})')


class Checkpoint(NamedTuple):
    """What :func:`read_checkpoint` found in a file.

    Attributes:
        state_dict: the parameters, one leading ``module.`` stripped, on CPU.
        wrappers: the entries descended into to reach them, e.g. ``['model']``.
        stripped_prefix: number of keys that lost a leading ``module.``.
        extras: the other top-level entries (``meta``, ``optimizer``, ``args`` ...).
    """
    state_dict: Dict[str, Tensor]
    wrappers: List[str]
    stripped_prefix: int
    extras: Dict[str, Any]


def read_checkpoint(path: str, safe_globals: Sequence[type] = ()) -> Checkpoint:
    """The weights in the checkpoint ``path``, wherever a training script put them: read
    weights-only (:func:`load_weights_only`), descend into ``'model'`` / ``'state_dict'``
    while they hold dicts (``'model'`` first: DeiT's ``'model_ema'`` is not taken;
    mmengine's ``'state_dict'``) and strip one leading ``module.`` (DDP) from every key.

    Raises:
        ValueError: one line: the file cannot be read, or holds no dict of tensors there
            (naming what it holds, or the first entry that is not a tensor).
    """
    top = load_weights_only(path, safe_globals)
    if not isinstance(top, Mapping):
        raise ValueError(f'{path} holds a {type(top).__name__}, not a dict of parameters')
    wrappers: List[str] = []
    sd = top
    while (inner := next((k for k in ('model', 'state_dict')
                          if isinstance(sd.get(k), Mapping)), None)) is not None:
        wrappers.append(inner)
        sd = sd[inner]
    if not any(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f'checkpoint {path} holds no model weights (a dict of tensors, or '
                         f'one under "model" or "state_dict"); it has {sorted(map(str, sd))[:6]}')
    out: Dict[str, Tensor] = {}
    for key, value in sd.items():
        if not isinstance(value, Tensor):
            where = ''.join(f'[{w!r}]' for w in wrappers)
            raise ValueError(f'{path}: entry {where}[{key!r}] is a {type(value).__name__}, '
                             'not a tensor')
        if not isinstance(key, str):
            raise ValueError(f'{path}: parameter name {key!r} is not a string')
        name = key[7:] if key.startswith('module.') else key
        if name in out:
            raise ValueError(f"{path}: parameter {name!r} appears twice (with and without "
                             "'module.')")
        out[name] = value
    stripped = sum(k.startswith('module.') for k in sd)
    extras = {k: v for k, v in top.items() if k != wrappers[0]} if wrappers else {}
    return Checkpoint(out, wrappers, stripped, extras)


def read_state_dict(path: str) -> Dict[str, Tensor]:
    """The model weights of a checkpoint (:func:`read_checkpoint`)."""
    return read_checkpoint(path).state_dict


def _names(keys: List[str]) -> str:
    more = f', ... (+{len(keys) - SHOWN})' if len(keys) > SHOWN else ''
    return ', '.join(keys[:SHOWN]) + more


def fit_problem(model: nn.Module, state_dict: Mapping[str, Tensor],
                allow_missing: Sequence[str] = ()) -> Optional[str]:
    """``None`` when ``state_dict`` has exactly the model's tensors with the model's
    shapes (those under the prefixes ``allow_missing`` may be absent), else one sentence
    counting the missing and unexpected keys and the shape mismatches, with a few names
    of each."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.startswith(tuple(allow_missing))]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}'
              for k in state_dict if k in own and state_dict[k].shape != own[k].shape]
    parts = [f'{len(keys)} {what} ({_names(keys)})' for what, keys in (
        ('missing keys', missing), ('unexpected keys', unexpected),
        ('shape mismatches, checkpoint vs model', shapes)) if keys]
    if not parts:
        return None
    return (f'{len(state_dict)} tensors against the model\'s {len(own)}: ' + '; '.join(parts))


def load_weights(model: nn.Module, path: str, allow_partial: bool = False) -> None:
    """Load the checkpoint ``path`` into ``model`` if it fits (:func:`fit_problem`).

    Args:
        model: the model built from the config.
        path: checkpoint file.
        allow_partial: load the tensors that fit (same name and shape) and warn about the
            rest, instead of refusing.

    Raises:
        ValueError: ``checkpoint PATH does not fit the model: ...`` (tools turn it into
            one line and exit status 2).
    """
    sd = read_state_dict(path)
    problem = fit_problem(model, sd)
    if problem is None:
        model.load_state_dict(sd, strict=True)
        return
    if not allow_partial:
        raise ValueError(f'checkpoint {path} does not fit the model: {problem} '
                         '(--allow-partial loads only what fits)')
    own = model.state_dict()
    fitting = {k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(fitting, strict=False)
    warnings.warn(f'--allow-partial: loaded {len(fitting)} of the model\'s {len(own)} '
                  f'tensors from {path}; the rest keep their initialisation ({problem})')


def check_weights(model: nn.Module, path: str, allow_partial: bool = False) -> None:
    """:func:`load_weights` without loading: raise the same ``ValueError`` when the
    checkpoint does not fit and ``allow_partial`` is False (for tools whose Runner loads
    the checkpoint itself)."""
    if allow_partial:
        return
    problem = fit_problem(model, read_state_dict(path))
    if problem is not None:
        raise ValueError(f'checkpoint {path} does not fit the model: {problem} '
                         '(--allow-partial loads only what fits)')


def class_count_problem(cfg: Any, model: nn.Module) -> Optional[str]:
    """``None`` unless the config's test dataset (its ``metainfo``, mmpretrain's
    ``classes`` list, or its class's ``METAINFO``) and the model's head (``decode_head``
    / ``head``, wrappers' ``module`` unwrapped) both state a class count and these
    differ; then one sentence naming both. The metrics would count only the dataset's
    classes and be silently wrong."""
    if cfg.get('default_scope') == 'mmseg':
        from mmseg.registry import DATASETS as registry
    else:
        from mmpretrain.registry import DATASETS as registry
    dataset = (cfg.get('test_dataloader') or {}).get('dataset') or {}
    # metainfo, else mmpretrain's ``classes`` argument, else the dataset class's METAINFO
    classes = (dataset.get('metainfo') or {}).get('classes', dataset.get('classes'))
    if classes is None and isinstance(dataset.get('type'), str):
        classes = getattr(registry.get(dataset['type']), 'METAINFO', {}).get('classes')
    if not isinstance(classes, (list, tuple)):  # unknown, or a file of class names
        return None
    while hasattr(model, 'module'):
        model = model.module
    head = getattr(model, 'decode_head', None) or getattr(model, 'head', None)
    n_cls = getattr(head, 'num_classes', None)
    if not isinstance(n_cls, int) or len(classes) == n_cls:
        return None
    return (f"the config's test dataset ({dataset.get('type')}) has {len(classes)} classes, "
            f'the model predicts {n_cls}: set the dataset (test_dataloader.dataset) or the '
            "head's num_classes before testing")
