"""Let ``torch.load(weights_only=True)`` read the checkpoints mmengine writes.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``: only tensors,
containers and allow-listed globals may be unpickled. mmengine 0.10.x checkpoints
carry more than weights -- ``message_hub`` stores :class:`~mmengine.logging.HistoryBuffer`
objects (numpy arrays of logged scalars) and the runtime info keeps numpy scalars --
so ``load_checkpoint`` / ``Runner.resume`` fail on checkpoints mmengine itself wrote.

:func:`register_mmengine_safe_globals` allow-lists exactly the globals found in such
checkpoints (determined by saving checkpoints through a ``Runner`` and loading them
back, see ``tests/test_tools.py``):

* ``mmengine.logging.history_buffer.HistoryBuffer``;
* numpy's array/scalar reconstruction: ``numpy.ndarray``, ``numpy.dtype``,
  ``numpy(._)core.multiarray._reconstruct`` and ``.scalar`` (both module spellings, so
  checkpoints written under numpy 1.x load under numpy 2.x and vice versa), and the
  concrete numeric dtype classes (``numpy.dtypes.Float64DType`` ...);
* ``builtins.getattr`` -- *not* the real one. A ``HistoryBuffer`` pickles its statistic
  methods as ``getattr(HistoryBuffer, 'mean')`` (pickle protocol 2 spelling of a method
  reference). Allowing the real ``getattr`` would let a malicious file reach any
  attribute of any allowed object (and from there ``__globals__``), so the name is
  mapped to :func:`_history_buffer_getattr`, which resolves only public methods of
  ``HistoryBuffer`` and raises ``UnpicklingError`` for anything else.

Arbitrary classes stay forbidden: a pickled user class still fails to load.
"""
import pickle
from typing import Any, Callable, List, Tuple, Union

import numpy as np
import torch

__all__ = ['register_mmengine_safe_globals', 'mmengine_safe_globals']

_REGISTERED = False


def _history_buffer_getattr(obj: Any, name: str) -> Callable:
    """Stand-in for ``getattr`` during ``weights_only`` unpickling.

    Only ``getattr(HistoryBuffer, <public method name>)`` is answered -- the sole use
    mmengine checkpoints make of ``getattr``.
    """
    from mmengine.logging import HistoryBuffer
    if obj is HistoryBuffer and isinstance(name, str) and not name.startswith('_'):
        member = HistoryBuffer.__dict__.get(name)
        if callable(member):
            return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'weights_only load: getattr({obj!r}, {name!r}) is not allowed; mmcbsa only '
        'allow-lists the public methods of mmengine.logging.HistoryBuffer')


def _numpy_multiarray_globals() -> List[Tuple[Callable, str]]:
    """``_reconstruct`` and ``scalar`` under both numpy 1.x and 2.x module paths."""
    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    out = []
    for fn_name in ('_reconstruct', 'scalar'):
        fn = getattr(multiarray, fn_name)
        for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
            out.append((fn, f'{module}.{fn_name}'))
    return out


def _numpy_dtype_classes() -> List[type]:
    """Concrete dtype classes of the numeric/bool dtypes (numpy >= 1.25)."""
    names = ('BoolDType', 'Int8DType', 'Int16DType', 'Int32DType', 'Int64DType',
             'UInt8DType', 'UInt16DType', 'UInt32DType', 'UInt64DType',
             'Float16DType', 'Float32DType', 'Float64DType', 'LongDoubleDType',
             'ByteDType', 'UByteDType', 'ShortDType', 'UShortDType', 'IntDType',
             'UIntDType', 'LongDType', 'ULongDType', 'LongLongDType',
             'ULongLongDType')
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is None:
        return []
    found = []
    for name in names:
        cls = getattr(dtypes, name, None)
        if cls is not None and cls not in found:
            found.append(cls)
    return found


def mmengine_safe_globals() -> List[Union[Callable, Tuple[Callable, str]]]:
    """The allow-list (objects or ``(object, 'module.name')`` pairs) mmcbsa registers."""
    from mmengine.logging import HistoryBuffer
    entries: List[Union[Callable, Tuple[Callable, str]]] = [
        HistoryBuffer, np.ndarray, np.dtype
    ]
    entries += _numpy_multiarray_globals()
    entries += _numpy_dtype_classes()
    entries.append((_history_buffer_getattr, 'builtins.getattr'))
    return entries


def register_mmengine_safe_globals() -> bool:
    """Allow-list the globals of mmengine checkpoints for ``weights_only`` loading.

    Idempotent (a second call changes nothing). Returns ``False`` when this torch has
    no ``torch.serialization.add_safe_globals`` (torch < 2.4; those default to
    ``weights_only=False`` anyway), else ``True``.
    """
    global _REGISTERED
    serialization = torch.serialization
    if not hasattr(serialization, 'add_safe_globals'):
        return False
    if _REGISTERED:
        return True
    entries = mmengine_safe_globals()
    if torch.__version__ < '2.6':  # (object, name) pairs are understood from 2.6 on
        entries = [entry for entry in entries if not isinstance(entry, tuple)]
    present = serialization.get_safe_globals()
    new = [entry for entry in entries if entry not in present]
    if new:
        serialization.add_safe_globals(new)
    _REGISTERED = True
    return True
