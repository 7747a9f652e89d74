"""Key-by-key renaming of a reference state dict, shared by the classifier converters."""
from typing import Dict, Iterable, Mapping

from torch import Tensor


class StateDictRenamer:
    """Collects renamed tensors and refuses to drop any reference key silently.

    Args:
        state_dict: the reference parameters.
        prefix: prepended to every output key.
        who: the converter's name, at the start of every error message.

    Example::

        ren = StateDictRenamer(sd, 'backbone.', 'convert_x')
        ren.take('cls_token', 'cls_token')
        out = ren.finish()  # KeyError naming every reference key nobody took
    """

    def __init__(self, state_dict: Mapping[str, Tensor], prefix: str, who: str) -> None:
        self.state_dict, self.prefix, self.who = state_dict, prefix, who
        self.out: Dict[str, Tensor] = {}
        self.used = set()

    def take(self, src: str, dst: str) -> None:
        """``out[prefix + dst] = state_dict[src]``; a missing ``src`` is a ``KeyError``."""
        if src not in self.state_dict:
            raise KeyError(f'{self.who}: missing reference key {src!r}')
        self.out[self.prefix + dst] = self.state_dict[src]
        self.used.add(src)

    def add(self, renamed: Mapping[str, Tensor], sources: Iterable[str]) -> None:
        """Tensors renamed elsewhere (``renamed``, full output keys) from ``sources``."""
        self.out.update(renamed)
        self.used.update(sources)

    def finish(self) -> Dict[str, Tensor]:
        """The renamed state dict; ``KeyError`` if any reference key was not used."""
        left = sorted(set(self.state_dict) - self.used)
        if left:
            raise KeyError(f'{self.who}: unconverted reference keys {left}')
        return self.out
