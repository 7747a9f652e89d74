"""Sizes a checkpoint does not store: what the user gives (:class:`ConvertOptions`) and
the rules the kinds (:mod:`mmcbsa.converters.kinds`) apply when reading the others."""
import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Tuple

from torch import Tensor

from .checkpoint_io import ConversionError

__all__ = ['ConvertOptions', 'Recognised', 'need', 'call_renames', 'resolve_heads', 'chosen',
           'square_grid']


@dataclass
class ConvertOptions:
    """Sizes the weights do not store, given by the user (None: read or official).

    Args:
        head_dims / num_heads: head width ``p`` / count ``H`` of the main attention.
        encoder_num_heads: heads of a Segmenter ViT encoder.
        num_reps: CBSA representatives (classifier, CBT decoder).
        rank_multi: Primal-Attention's sampled positions per rank.
        pool_size: MiTA's landmark grid side ``P`` (``P²`` landmarks).
        kv_topk: MiTA's ``K`` (``K²`` routed keys per landmark, as the reference).
    """
    head_dims: Optional[int] = None
    num_heads: Optional[int] = None
    encoder_num_heads: Optional[int] = None
    num_reps: Optional[int] = None
    rank_multi: Optional[int] = None
    pool_size: Optional[int] = None
    kv_topk: Optional[int] = None

    @staticmethod
    def flag(name: str) -> str:
        """The command-line spelling (``head_dims`` -> ``--head-dims``)."""
        return '--' + name.replace('_', '-')

    def given(self) -> Dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}

    def validate(self) -> None:
        """Every given value is a positive integer (else :class:`ConversionError`)."""
        for name, value in self.given().items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConversionError(f'{self.flag(name)} must be a positive integer, '
                                      f'got {value!r}')


@dataclass
class Recognised:
    """What a kind read: ``sizes`` (mmcbsa names), ``defaults`` (``{size names: why}``
    for those the weights do not store) and ``notes`` for the report."""
    sizes: Dict[str, Any]
    defaults: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


def need(state_dict: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in state_dict:
        raise ConversionError(f'reference key {key!r} not found')
    return state_dict[key]


def call_renames(fn, *args):
    """A rename function's ``KeyError`` / ``ValueError`` as :class:`ConversionError`."""
    try:
        return fn(*args)
    except (KeyError, ValueError, TypeError, IndexError) as e:
        message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        raise ConversionError(' '.join(message.split())) from None


def resolve_heads(rows: int, rows_from: str, opts: ConvertOptions, default_head_dims: int,
                  read_heads: Optional[int] = None, read_from: str = '',
                  heads_flag: str = 'num_heads',
                  dims_flag: Optional[str] = 'head_dims') -> Tuple[int, int, Optional[str]]:
    """Heads ``H`` and width ``p`` of a projection with ``rows = H·p`` rows: read off a
    per-head tensor (``read_heads``), given (``opts.<heads_flag>``, ``opts.<dims_flag>``)
    or from ``default_head_dims``. Returns ``(H, p, why)``, ``why`` None when read.
    Raises :class:`ConversionError` when a given value contradicts the tensors."""
    heads, dims = getattr(opts, heads_flag), getattr(opts, dims_flag) if dims_flag else None
    hflag = ConvertOptions.flag(heads_flag)
    pflag = ConvertOptions.flag(dims_flag) if dims_flag else hflag
    if read_heads is not None:
        p = rows // read_heads if read_heads > 0 else 0
        if p * read_heads != rows:
            raise ConversionError(f'{rows_from} has {rows} rows, not a multiple of the '
                                  f'{read_heads} heads of {read_from}')
        if heads not in (None, read_heads):
            raise ConversionError(f'{hflag} {heads} contradicts {read_from}, which holds '
                                  f'{read_heads} heads')
        if dims not in (None, p):
            raise ConversionError(f'{pflag} {dims} contradicts the tensors: {rows_from} has '
                                  f'{rows} rows for the {read_heads} heads of {read_from}, '
                                  f'i.e. head width {p}')
        return read_heads, p, None
    if heads is not None and dims is not None and heads * dims != rows:
        raise ConversionError(f'{hflag} {heads} x {pflag} {dims} = {heads * dims}, but '
                              f'{rows_from} has {rows} rows')
    if heads is not None and rows % heads:
        raise ConversionError(f'{hflag} {heads} does not divide the {rows} rows of {rows_from}')
    p = dims or (rows // heads if heads else default_head_dims)
    if rows % p:
        source = pflag if dims else f'the official default {p}'
        raise ConversionError(f'{rows_from} has {rows} rows, not a multiple of the head width '
                              f'{p} ({source}); give {pflag} or {hflag}')
    given = [f for f, v in ((hflag, heads), (pflag, dims)) if v is not None]
    count = f'{rows // p} head{"s" * (rows != p)} of'
    why = f'{count} width {p}, given ({", ".join(given)})' if given else (
        f'{count} the official width {p} ({rows_from}: {rows} = H*p, no per-head '
        f'tensor; {" / ".join(dict.fromkeys((pflag, hflag)))} to change)')
    return rows // p, p, why


def chosen(rec: Recognised, name: str, opts: ConvertOptions, official: Any,
           why: str, saved: Any = None) -> Any:
    """A size the weights do not store: given, else ``saved`` (the checkpoint's args),
    else ``official``; recorded in ``rec.defaults``."""
    given = getattr(opts, name)
    flag = ConvertOptions.flag(name)
    if given is not None:
        rec.defaults[name] = f'{given}, given ({flag})'
        return given
    if isinstance(saved, int) and not isinstance(saved, bool):
        rec.defaults[name] = f"{saved}, the checkpoint's args.{name}"
        return saved
    rec.defaults[name] = f'{official}, {why} ({flag} to change)'
    return official


def square_grid(tokens: int, key: str, width: int) -> int:
    side = math.isqrt(max(tokens - 1, 0))
    if tokens < 2 or side * side != tokens - 1:
        raise ConversionError(f'{key} has {tokens} positions: not CLS + a square grid of '
                              f'width {width} (distilled models with a dist_token are not '
                              'supported)')
    return side
