"""``warn_once``: the one warning helper, at the bottom of the package's layers
(``ops`` → ``models`` → ``analysis`` / ``converters`` → ``tools``) so that every layer
can use it without importing a higher one."""
import warnings
from typing import Set

import torch

try:  # runs a function while dynamo traces, without a graph break
    from torch._dynamo.comptime import comptime
except ImportError:  # pragma: no cover - torch without dynamo
    comptime = None

_WARNED: Set[str] = set()


def _emit(key: str, message: str, stacklevel: int) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=stacklevel)


def _emit_while_tracing(ctx) -> None:
    """Called by ``comptime`` with :func:`warn_once`'s frame: warn at trace time."""
    try:
        key = ctx.get_local('key').as_python_constant()
        message = ctx.get_local('message').as_python_constant()
    except Exception:  # a message that is not a constant of the trace: no warning
        return
    _emit(key, message, 2)


def warn_once(key: str, message: str) -> None:
    """``warnings.warn(message)`` the first time ``key`` is seen in this process.

    Under ``torch.compile`` the warning is given while the model is traced (dynamo's
    ``comptime``): ``warnings.warn`` itself would break the graph, and a graph break
    inside an attention's forward makes dynamo recompile its remainder with dynamic
    shapes for every layer of another size (which inductor then failed to lower for
    adaptive pooling: CBT-S + CBT head training at 64², torch 2.13)."""
    if comptime is not None and torch.compiler.is_compiling():
        comptime(_emit_while_tracing)
        return
    _emit(key, message, 4)
