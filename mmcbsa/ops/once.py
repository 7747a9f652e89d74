"""``warn_once``: the one warning helper, at the bottom of the package's layers
(``ops`` → ``models`` → ``analysis`` / ``converters`` → ``tools``) so that every layer
can use it without importing a higher one."""
import warnings
from typing import Set

_WARNED: Set[str] = set()


def warn_once(key: str, message: str) -> None:
    """``warnings.warn(message)`` the first time ``key`` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)
