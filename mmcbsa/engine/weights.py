"""Does a checkpoint fit a model? One policy for the tools that load weights
(tools/test.py and the analysis tools): a checkpoint whose tensors do not match the
model's — keys missing, keys the model does not have, shapes that differ — is refused
with one line that counts them and names a few, instead of mmengine's ``strict=False``
load, which warns in the log and goes on with partly random weights. ``--allow-partial``
loads what fits, for the cases a researcher really wants (a decoder on another encoder,
a checkpoint of an older layout).

Checkpoints are read by :func:`load_weights_only` (``torch.load(weights_only=True)``;
mmengine's metadata is allow-listed by importing mmcbsa, :mod:`mmcbsa.engine.safe_globals`),
the one loader of the tools and the converters: a missing, empty, truncated or corrupt
file, or one that is not weights-only, is a one-line ``ValueError``.
"""
import os.path as osp
import pickle
import re
import warnings
import zipfile
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ['load_weights_only', 'read_state_dict', 'fit_problem', 'load_weights',
           'check_weights']

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


def read_state_dict(path: str) -> Dict[str, Tensor]:
    """The model weights of a checkpoint: its ``state_dict`` entry (mmengine), or the
    whole file when it is a plain dict of tensors; a DDP ``module.`` prefix is dropped.

    Raises:
        ValueError: the file cannot be read weights-only (:func:`load_weights_only`), or
            it holds no weights (naming its top-level keys).
    """
    ckpt = load_weights_only(path)
    sd = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if (not isinstance(sd, dict) or not sd
            or not all(isinstance(v, Tensor) for v in sd.values())):
        keys = sorted(map(str, ckpt))[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f'checkpoint {path} holds no model weights (a dict of tensors, or '
                         f'one under "state_dict"); it has {keys}')
    return {(k[7:] if k.startswith('module.') else k): v for k, v in sd.items()}


def _names(keys: List[str]) -> str:
    more = f', ... (+{len(keys) - SHOWN})' if len(keys) > SHOWN else ''
    return ', '.join(keys[:SHOWN]) + more


def fit_problem(model: nn.Module, state_dict: Dict[str, Tensor]) -> Optional[str]:
    """``None`` when ``state_dict`` has exactly the model's tensors with the model's
    shapes, else one sentence counting the missing and unexpected keys and the shape
    mismatches, with a few names of each."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
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
