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
    num_heads = getattr(opts, heads_flag)
    head_dims = getattr(opts, dims_flag) if dims_flag else None
    hflag = ConvertOptions.flag(heads_flag)
    pflag = ConvertOptions.flag(dims_flag) if dims_flag else hflag
    if read_heads is not None:
        if read_heads <= 0 or rows % read_heads:
            raise ConversionError(f'{rows_from} has {rows} rows, not a multiple of the '
                                  f'{read_heads} heads of {read_from}')
        p = rows // read_heads
        if num_heads is not None and num_heads != read_heads:
            raise ConversionError(f'{hflag} {num_heads} contradicts {read_from}, which holds '
                                  f'{read_heads} heads')
        if head_dims is not None and head_dims != p:
            raise ConversionError(f'{pflag} {head_dims} contradicts the tensors: {rows_from} '
                                  f'has {rows} rows for the {read_heads} heads of {read_from}, '
                                  f'i.e. head width {p}')
        return read_heads, p, None
    if num_heads is not None and head_dims is not None:
        if num_heads * head_dims != rows:
            raise ConversionError(f'{hflag} {num_heads} x {pflag} {head_dims} = '
                                  f'{num_heads * head_dims}, but {rows_from} has {rows} rows')
        return num_heads, head_dims, f'{num_heads} x {head_dims}, given ({hflag}, {pflag})'
    if num_heads is not None:
        if rows % num_heads:
            raise ConversionError(f'{hflag} {num_heads} does not divide the {rows} rows of '
                                  f'{rows_from}')
        return num_heads, rows // num_heads, (f'{num_heads} heads given ({hflag}), of width '
                                              f'{rows // num_heads}')
    p = head_dims if head_dims is not None else default_head_dims
    if rows % p:
        source = pflag if head_dims is not None else f'the official default {p}'
        raise ConversionError(f'{rows_from} has {rows} rows, not a multiple of the head width '
                              f'{p} ({source}); give {pflag} or {hflag}')
    why = f'{p}, given ({pflag}): {rows // p} heads' if head_dims is not None else (
        f'{p}, the official head width ({rows_from} holds H*p = {rows} rows and no '
        f'per-head tensor; {pflag} / {hflag} to change)')
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
