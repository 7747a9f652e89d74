"""The kinds of released checkpoint that ``official2mmcbsa`` recognises.

A :class:`Kind` knows one reference layout: a :meth:`~Kind.match` predicate over the
checkpoint's own keys and shapes, :meth:`~Kind.infer` (the sizes the tensors tell,
plus the official defaults of those they cannot), :meth:`~Kind.convert` (the renames
of the per-kind converters in this package), :meth:`~Kind.model_cfg` (the mmpretrain /
mmseg model with exactly those sizes) and what is needed to find and adapt one of
``configs/``' configs (:meth:`~Kind.needles`, :meth:`~Kind.overrides`).
:func:`recognise` picks the one kind whose predicate holds.

Kinds (``KINDS``; the names are what ``official2mmcbsa`` prints and records):

======================  =============================================================
``cbt-classifier``      CBSA repository classifier: conv stem + [CBSA, ISTA] blocks
``crate-classifier``    the same with MSSA (CRATE)
``tost-classifier``     the same with TSSA (ToST)
``primal-deit``         Primal.+DeiT (timm DeiT, last blocks Primal-Attention)
``primalformer``        PrimalFormer (every block Primal-Attention)
``mita-deit``           MiTA-DeiT (timm DeiT, MiTA attention)
``mita-dwc-deit``       MiTA-DeiT +DWC
``mita-dwc-gate-deit``  MiTA-DeiT +DWC,Gate
``depict-sa-segmenter`` Segmenter ViT encoder (``encoder.*``) + DEPICT-SA (``decoder.*``)
``depict-ca-segmenter`` the same with DEPICT-CA
``cbt-segmenter``       the same with the CBT decoder (CBSA paper)
``depict-sa-decoder``   the DEPICT-SA decoder alone (bare or under ``decoder.``)
``depict-ca-decoder``   the DEPICT-CA decoder alone
``cbt-decoder``         the CBT decoder alone
``attention-only``      one attention module (refused: not a model checkpoint)
======================  =============================================================

Sizes the tensors cannot tell, their official defaults, and the options that change
them (:class:`ConvertOptions`):

- MSSA (CRATE) head count: ``U`` is ``H·p × d`` with no per-head tensor; ``p = 64``
  (official CRATE/CBT code), ``head_dims`` / ``num_heads`` to say otherwise. CBSA and
  TSSA store one step size / temperature per head: their heads are read, and a
  given value is checked against them.
- DEPICT decoders: ``U`` likewise; ``p = 100`` (hard-coded in the reference). The
  CA cross-attention layers use the same head count; their width is read as
  ``rows / H`` (the reference's 50 for its 3 heads).
- CBT decoder: heads read from ``step_x``; ``num_reps`` 100 (10×10, the reference's).
- CBT classifier: ``num_reps`` 64 (8×8).
- MiTA-DeiT: heads ``d / 64`` (DeiT's head width); ``pool_size`` 5 (5×5 landmarks) and
  ``kv_topk`` 5 (25 routed keys), or the values of the ``args`` that MiTA-DeiT's
  ``main.py`` saves in the checkpoint; the +DWC module fixes 5×5 and 25.
- Primal: heads read from ``attn.we``; ``rank_multi`` read from the sample count
  when it is below the token count, else 10.
- Segmenter encoder: heads ``d / 64`` (every Segmenter ViT), ``encoder_num_heads``.
"""
import inspect
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from mmcbsa.models.backbones.white_box_vit import WhiteBoxViT
from mmcbsa.registry import SEG_MODELS
from .cbt_decoder import (cbt_head_kwargs_from_reference, convert_cbt_decoder,
                          convert_cbt_segmenter, infer_cbt_decoder_config)
from .checkpoint_io import ConversionError
from .depict import (convert_depict, convert_depict_segmenter,
                     depict_head_kwargs_from_reference, infer_depict_config)
from .mita_deit import convert_mita_deit, mita_deit_model_cfg
from .primal_vit import (DEFAULT_RANK_MULTI, convert_primal_vit, infer_primal_vit_config,
                         primal_vit_model_cfg)
from .segmenter import ENCODER_DROPPED
from .timm_vit import infer_timm_vit_sizes, timm_block_indices
from .white_box_vit import (convert_white_box_vit, infer_white_box_vit_config,
                            white_box_vit_model_cfg)

__all__ = ['ConvertOptions', 'Recognised', 'Kind', 'KINDS', 'register_kind', 'recognise']


# ---------------------------------------------------------------------------- options
@dataclass
class ConvertOptions:
    """Sizes the weights do not store, given by the user (None: read or default).

    Args:
        head_dims: head width ``p`` of the kind's main attention.
        num_heads: head count ``H`` of the kind's main attention.
        encoder_num_heads: heads of a Segmenter ViT encoder.
        num_reps: CBSA representatives (classifier) / CBT decoder representatives.
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
        """The command-line spelling of an option (``head_dims`` -> ``--head-dims``)."""
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
    """What a kind read from a checkpoint.

    Attributes:
        sizes: the reference-style config the converters of this package take.
        defaults: ``{size name: why}`` for sizes that are not stored in the weights
            (official default, or the checkpoint's ``args``).
        notes: further remarks printed with the report.
    """
    sizes: Dict[str, Any]
    defaults: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- helpers
_MISSING = object()


def _plain(value: Any) -> Any:
    """Config values compared as plain data (ConfigDict -> dict, list -> tuple)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _same(a: Any, b: Any) -> bool:
    return _plain(a) == _plain(b)


def _default(cls: Optional[type], name: str) -> Any:
    """Default of ``cls.__init__``'s argument ``name`` (``_MISSING`` if none)."""
    if cls is None:
        return _MISSING
    param = inspect.signature(cls.__init__).parameters.get(name)
    if param is None or param.default is inspect.Parameter.empty:
        return _MISSING
    return param.default


def _need(state_dict: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in state_dict:
        raise ConversionError(f'reference key {key!r} not found')
    return state_dict[key]


def _call(fn, *args, **kwargs):
    """Run a converter function; its ``KeyError`` / ``ValueError`` become
    :class:`ConversionError` with the same (one-line) message."""
    try:
        return fn(*args, **kwargs)
    except ConversionError:
        raise
    except (KeyError, ValueError, TypeError, IndexError) as e:
        message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        raise ConversionError(' '.join(message.split())) from None


def _resolve_heads(rows: int, rows_from: str, opts: ConvertOptions, default_head_dims: int,
                   read_heads: Optional[int] = None, read_from: str = '',
                   heads_flag: str = 'num_heads',
                   dims_flag: Optional[str] = 'head_dims') -> Tuple[int, int, Optional[str]]:
    """Heads ``H`` and head width ``p`` of a projection with ``rows = H·p`` rows.

    Args:
        rows: rows of the projection.
        rows_from: what the rows are (for messages).
        opts: user options (``opts.<heads_flag>``, ``opts.<dims_flag>``).
        default_head_dims: official head width, used when nothing else tells.
        read_heads: heads stored in a per-head tensor, if there is one.
        read_from: that tensor (for messages).
        heads_flag / dims_flag: option names (``dims_flag`` None: no such option).

    Returns:
        ``(H, p, why)`` where ``why`` says where ``H`` and ``p`` come from when they were
        not read off a per-head tensor (given, or the official default); None if read.

    Raises:
        ConversionError: a given value contradicts the tensors or the other value, or
            the rows are not a multiple of the width.
    """
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


def _probe_image(size: int, batch: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, size, size, generator=gen)


# ---------------------------------------------------------------------------- base
class Kind:
    """One released-checkpoint layout (see the module docstring).

    Attributes:
        name: short name (printed, recorded in the converted checkpoint's ``meta``).
        title: one-line description.
        scope: ``'mmpretrain'`` or ``'mmseg'``: the registry the model is built in.
        options: :class:`ConvertOptions` fields this kind reads; others are refused.
        config_dirs: folders of ``configs/`` holding configs this kind may inherit.
        expected_missing: model key prefixes a checkpoint of this kind does not fill
            (with the reason), e.g. the encoder of a decoder-only checkpoint.
        base_has_model: the :meth:`base_files` define a model (replaced by the
            written one with ``_delete_=True``).
    """
    name = ''
    title = ''
    scope = 'mmpretrain'
    options: frozenset = frozenset()
    config_dirs: Tuple[str, ...] = ()
    expected_missing: Dict[str, str] = {}
    base_has_model = False

    def match(self, state_dict: Mapping[str, Tensor]) -> bool:
        raise NotImplementedError

    def infer(self, state_dict: Mapping[str, Tensor], opts: ConvertOptions,
              extras: Mapping[str, Any]) -> Recognised:
        """Sizes read off the tensors (and defaults), checked against ``opts``."""
        raise NotImplementedError

    def convert(self, state_dict: Mapping[str, Tensor],
                sizes: Mapping[str, Any]) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
        """``(converted state dict, {source key not used: why})``."""
        raise NotImplementedError

    def model_cfg(self, sizes: Mapping[str, Any]) -> dict:
        """The complete model config with exactly these sizes."""
        raise NotImplementedError

    def base_files(self, configs_root: Optional[str]) -> List[str]:
        """``_base_`` of a config that writes the whole model (dataset, schedule,
        runtime; a model they hold is replaced, ``_delete_=True``)."""
        raise NotImplementedError

    def needles(self, sizes: Mapping[str, Any]) -> Optional[List[Tuple[str, ...]]]:
        """Cheap filter on a candidate config's text (with its relative bases): every
        group must have one string in it. None: no config can match."""
        return None

    def overrides(self, cand_model: Mapping, full_model: Mapping) -> Optional[dict]:
        """What to change in a candidate config's model so that it is ``full_model``,
        or None when it differs in a size (only non-size settings are overridden)."""
        return None

    def probe(self, model: torch.nn.Module, sizes: Mapping[str, Any]) -> Tensor:
        """A deterministic forward pass used to compare two built models."""
        raise NotImplementedError

    def describe(self, sizes: Mapping[str, Any]) -> str:
        return self.title

    def check_options(self, opts: ConvertOptions) -> None:
        """Refuse options this kind does not read (:class:`ConversionError`)."""
        extra = sorted(set(opts.given()) - set(self.options))
        if extra:
            flags = ', '.join(ConvertOptions.flag(n) for n in extra)
            reads = ', '.join(sorted(ConvertOptions.flag(n) for n in self.options))
            raise ConversionError(f'{flags} does not apply to a {self.name} checkpoint '
                                  f'(it reads: {reads or "no option"})')


KINDS: Dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    """Add ``kind`` to :data:`KINDS` (names are unique)."""
    if kind.name in KINDS:
        raise ValueError(f'register_kind: a kind named {kind.name!r} exists')
    KINDS[kind.name] = kind
    return kind


def _summary(state_dict: Mapping[str, Tensor], limit: int = 4) -> str:
    tops: Dict[str, int] = {}
    for key in state_dict:
        top = key.split('.')[0]
        tops[top] = tops.get(top, 0) + 1
    names = ', '.join(f'{t} ({n})' for t, n in list(tops.items())[:8])
    if len(tops) > 8:
        names += f', ... ({len(tops)} names)'
    examples = ', '.join(f'{k} {tuple(v.shape)}' for k, v in list(state_dict.items())[:limit])
    return f'{len(state_dict)} tensors under {names}; first: {examples}'


def recognise(state_dict: Mapping[str, Tensor]) -> Kind:
    """The one kind of :data:`KINDS` whose predicate holds for ``state_dict``.

    Raises:
        ConversionError: no kind matches (the message says what was seen), or more
            than one does.
    """
    found = [kind for kind in KINDS.values() if kind.match(state_dict)]
    if len(found) > 1:
        raise ConversionError(f'ambiguous checkpoint: it matches the kinds '
                              f'{[k.name for k in found]} ({_summary(state_dict)})')
    if not found:
        hint = ''
        if any(k.startswith(('backbone.', 'decode_head.')) for k in state_dict):
            hint = ' -- it looks like an mmcbsa / OpenMMLab checkpoint already: use it ' \
                   'with its config directly'
        raise ConversionError(f'unknown kind of checkpoint: {_summary(state_dict)}{hint}; '
                              f'known kinds: {", ".join(KINDS)}')
    return found[0]


# ------------------------------------------------------------------- WhiteBoxViT kinds
def _zoo_names(prefix: str, dims: int, layers: int, heads: int) -> List[str]:
    return [name for name, arch in WhiteBoxViT.arch_zoo.items()
            if name.startswith(prefix) and (arch['embed_dims'], arch['num_layers'],
                                            arch['num_heads']) == (dims, layers, heads)]


_ARCH_IDENTITY = ('embed_dims', 'num_layers', 'num_heads', 'stem', 'layout')


def _attention_class(cfg: Mapping) -> Optional[type]:
    kind = cfg.get('type')
    return SEG_MODELS.get(kind) if isinstance(kind, str) else None


def _whitebox_overrides(cand: Mapping, full: Mapping,
                        attn_allowed: Sequence[str]) -> Optional[dict]:
    """Overrides turning a candidate ``WhiteBoxViT`` classifier config into ``full``.

    Sizes (arch widths/depth/heads, stem, layout, every attention argument except
    ``attn_allowed``) must be equal; ``img_size``, the class count and the
    ``attn_allowed`` arguments (e.g. ``legacy_pooling``) are overridden.
    """
    bb, fbb = cand.get('backbone') or {}, full['backbone']
    if cand.get('type', 'ImageClassifier') != full['type'] or bb.get('type') != 'WhiteBoxViT':
        return None
    # the arch as WhiteBoxViT resolves it (zoo name or dict, ``base`` included)
    try:
        settings = WhiteBoxViT.resolve_arch(bb.get('arch', _default(WhiteBoxViT, 'arch')))
    except (ValueError, TypeError):
        return None
    farch = fbb['arch']
    if any(not _same(settings.get(k), farch.get(k)) for k in _ARCH_IDENTITY):
        return None
    if bb.get('layer_cfgs') or fbb.get('layer_cfgs'):
        return None  # per-layer changes: only the written model says exactly what it is
    n_tail = settings.get('num_tail_layers', 0) or 0
    if n_tail != farch.get('num_tail_layers', 0):
        return None
    bb_over: Dict[str, Any] = {}
    for key in ('attn_cfg', 'tail_attn_cfg'):
        want = farch.get(key)
        have = settings.get(key)
        if want is None or have is None:
            if (want is None and have is None) or (key == 'tail_attn_cfg' and not n_tail):
                continue
            return None
        if have.get('type') != want.get('type'):
            return None
        cls = _attention_class(want)
        diff = {}
        for name, value in want.items():
            current = have.get(name, _default(cls, name))
            if name == 'type' or _same(current, value):
                continue
            if name not in attn_allowed:
                return None
            diff[name] = value
        extra = [n for n in have if n not in want and not _same(have[n], _default(cls, n))]
        if extra:
            return None
        if diff and key == 'tail_attn_cfg':
            return None  # the arch's own tail: only the written model says it
        if diff:  # every block's attention, on top of the arch's (WhiteBoxViT)
            bb_over['layer_cfgs'] = dict(attn_cfg=diff)
    if not _same(bb.get('patch_size', _default(WhiteBoxViT, 'patch_size')), fbb['patch_size']):
        return None
    if not _same(bb.get('img_size', _default(WhiteBoxViT, 'img_size')), fbb['img_size']):
        bb_over['img_size'] = fbb['img_size']
    over: Dict[str, Any] = {}
    if bb_over:
        over['backbone'] = bb_over
    num_classes = full['head']['num_classes']
    if (cand.get('head') or {}).get('num_classes') != num_classes:
        over['head'] = dict(num_classes=num_classes)
    return over


def _deit_bases(configs_root: Optional[str]) -> List[str]:
    # mmpretrain's DeiT recipe (ImageNet, AdamW 300 epochs), as configs/mita and
    # configs/primal use it; its model is replaced
    return ['mmpretrain::deit/deit-small_4xb256_in1k.py']


class _Classifier(Kind):
    """Shared by the classifier kinds: probe = logits of a fixed random image at the
    training size, ``model(x, mode='tensor')``."""
    scope = 'mmpretrain'
    zoo_prefix = ''
    attn_allowed: Tuple[str, ...] = ()

    def probe(self, model, sizes):
        return model(_probe_image(int(self._img_size(sizes))), mode='tensor')

    def _img_size(self, sizes) -> int:
        return sizes['img_size']

    def _arch_sizes(self, sizes) -> Tuple[int, int, int]:
        raise NotImplementedError

    def needles(self, sizes):
        names = _zoo_names(self.zoo_prefix, *self._arch_sizes(sizes))
        return [tuple(f"'{n}'" for n in names)] if names else None

    def overrides(self, cand_model, full_model):
        return _whitebox_overrides(cand_model, full_model, self.attn_allowed)


class WhiteBoxClassifier(_Classifier):
    """CBSA repository classifiers (``models.VisionTransformer``: conv stem +
    ``[attention, ISTA]`` blocks + LN/Linear head; docs/mechanisms.md §1, §2)."""
    _ATTN = 'transformer.layers.0.0.fn.'
    _FAMILY = {'CBSA': 'cbt', 'MSSA': 'crate', 'TSSA': 'tost'}
    _TITLE = {'CBSA': 'CBT classifier: conv stem + [CBSA, ISTA] blocks (docs/mechanisms.md §1)',
              'MSSA': 'CRATE classifier: conv stem + [MSSA, ISTA] blocks (docs/mechanisms.md §2)',
              'TSSA': 'ToST classifier: conv stem + [TSSA, ISTA] blocks (docs/mechanisms.md §2)'}

    def __init__(self, attn: str) -> None:
        self.attn = attn
        family = self._FAMILY[attn]
        self.name = f'{family}-classifier'
        self.title = self._TITLE[attn]
        self.zoo_prefix = f'{family}-'
        self.config_dirs = (family, )
        self.options = frozenset({'head_dims', 'num_heads'} |
                                 ({'num_reps'} if attn == 'CBSA' else set()))
        self.attn_allowed = ('legacy_pooling', ) if attn == 'CBSA' else ()

    def match(self, sd):
        if 'to_patch_embedding.proj.0.0.weight' not in sd:
            return False
        a = self._ATTN
        rep, temp, qkv = a + 'step_rep' in sd, a + 'temp' in sd, a + 'qkv.weight' in sd
        return {'CBSA': rep, 'TSSA': temp and not rep,
                'MSSA': qkv and not rep and not temp}[self.attn]

    def infer(self, sd, opts, extras):
        a = self._ATTN
        rows_key = a + ('proj.weight' if self.attn == 'CBSA' else 'qkv.weight')
        rows = int(_need(sd, rows_key).shape[0])
        read_heads, read_from = None, ''
        if self.attn == 'CBSA':
            read_heads, read_from = _need(sd, a + 'step_rep').numel(), a + 'step_rep'
            if _need(sd, a + 'step_x').numel() != read_heads:
                raise ConversionError(f'{a}step_rep and {a}step_x disagree on the head count '
                                      f'({read_heads} vs {sd[a + "step_x"].numel()})')
        elif self.attn == 'TSSA':
            read_heads, read_from = int(_need(sd, a + 'temp').shape[0]), a + 'temp'
        heads, p, why = _resolve_heads(rows, rows_key, opts, 64, read_heads, read_from)
        config = _call(infer_white_box_vit_config, sd, dim_head=p)
        if config['attn'] != self.attn or config['heads'] != heads:
            raise ConversionError(f'inconsistent attention layout at {a}: read '
                                  f"{config['attn']} with {config['heads']} heads")
        rec = Recognised(config)
        if why:
            rec.defaults['heads, dim_head'] = why
        if self.attn == 'CBSA':
            config['num_reps'] = opts.num_reps or 64
            rec.defaults['num_reps'] = (
                '64, the official 8x8 representatives (--num-reps to change)'
                if opts.num_reps is None else f'{opts.num_reps}, given (--num-reps)')
        return rec

    def convert(self, sd, sizes):
        return _call(convert_white_box_vit, sd, sizes), {}

    def model_cfg(self, sizes):
        return white_box_vit_model_cfg(sizes, legacy_pooling=True)

    def base_files(self, configs_root):
        schedule = (f'{configs_root}/_base_/schedules/imagenet_bs256_lion_150e.py'
                    if configs_root else 'mmpretrain::_base_/schedules/imagenet_bs256.py')
        return ['mmpretrain::_base_/datasets/imagenet_bs32.py', schedule,
                'mmpretrain::_base_/default_runtime.py']

    def _img_size(self, sizes):
        return sizes['image_size']

    def _arch_sizes(self, sizes):
        return sizes['dim'], sizes['depth'], sizes['heads']


def _is_timm_vit(sd: Mapping[str, Tensor]) -> bool:
    return ('patch_embed.proj.weight' in sd and 'cls_token' in sd
            and 'blocks.0.norm1.weight' in sd)


class PrimalClassifier(_Classifier):
    """Primal-Attention classifiers (PrimalAttention repository ``models_primal.py`` /
    ``models_combo.py``: timm ViTs; docs/mechanisms.md §6)."""
    config_dirs = ('primal', )
    base_has_model = True
    options = frozenset({'num_heads', 'head_dims', 'rank_multi'})

    def __init__(self, former: bool) -> None:
        self.former = former
        self.name = 'primalformer' if former else 'primal-deit'
        self.title = ('PrimalFormer: every block Primal-Attention (docs/mechanisms.md §6)'
                      if former else 'Primal.+DeiT: timm DeiT whose last blocks use '
                      'Primal-Attention (docs/mechanisms.md §6)')
        self.zoo_prefix = 'primalformer-' if former else 'primal-deit-'

    def match(self, sd):
        if not _is_timm_vit(sd):
            return False
        blocks = timm_block_indices(sd)
        primal = [i for i in blocks if f'blocks.{i}.attn.we' in sd]
        return bool(primal) and (len(primal) == len(blocks)) == self.former

    def infer(self, sd, opts, extras):
        config = _call(infer_primal_vit_config, sd, opts.rank_multi, opts.num_heads)
        p = config['embed_dim'] // config['num_heads']
        if opts.head_dims is not None and opts.head_dims != p:
            raise ConversionError(f'--head-dims {opts.head_dims} contradicts the tensors: '
                                  f"width {config['embed_dim']} over the {config['num_heads']} "
                                  f'heads of attn.we is {p}')
        rec = Recognised(config)
        if opts.rank_multi is None:
            tokens = (config['img_size'] // config['patch_size']) ** 2 + 1
            last = timm_block_indices(sd)[-1]
            if sd[f'blocks.{last}.attn.we'].shape[1] == tokens:
                rec.defaults['rank_multi'] = (
                    f'{DEFAULT_RANK_MULTI}, the official value (attn.we samples all {tokens} '
                    'tokens, so the weights cannot tell; --rank-multi to change)')
        else:
            rec.defaults['rank_multi'] = (f'{opts.rank_multi}, given (--rank-multi; checked '
                                          'against the sample count of attn.we)')
        return rec

    def convert(self, sd, sizes):
        return _call(convert_primal_vit, sd, sizes), {}

    def model_cfg(self, sizes):
        return primal_vit_model_cfg(sizes)

    def base_files(self, configs_root):
        return _deit_bases(configs_root)

    def _arch_sizes(self, sizes):
        return sizes['embed_dim'], sizes['depth'], sizes['num_heads']


class MiTADeiT(_Classifier):
    """MiTA-DeiT classifiers (MiTA repository ``MiTA-DeiT/main.py``; docs/mechanisms.md
    §5): timm DeiT blocks whose attention is ``MiTA_Attention`` (``qkv``, ``proj``),
    ``MiTA_Attention_Conv`` (``+ dwc``) or ``MiTA_Attention_Conv_Gate`` (``qkvg``)."""
    config_dirs = ('mita', )
    base_has_model = True
    zoo_prefix = 'mita-deit-'
    attn_allowed = ('legacy_pooling', )
    options = frozenset({'num_heads', 'head_dims', 'pool_size', 'kv_topk'})

    def __init__(self, dwc: bool, gate: bool = False) -> None:
        self.dwc, self.gate = dwc, gate
        self.name = 'mita-dwc-gate-deit' if gate else ('mita-dwc-deit' if dwc else 'mita-deit')
        self.title = ('MiTA-DeiT ' + ('+DWC,Gate' if gate else '+DWC' if dwc else '') +
                      ': timm DeiT with Mixture-of-Top-k Attention (docs/mechanisms.md §5)')

    @staticmethod
    def _gated(sd) -> bool:
        if any(k.endswith('.attn.qkvg.weight') for k in sd):
            return True
        qkv, cls = sd.get('blocks.0.attn.qkv.weight'), sd.get('cls_token')
        return qkv is not None and cls is not None and qkv.shape[0] == 4 * cls.shape[-1]

    def match(self, sd):
        if not _is_timm_vit(sd) or any(k.endswith('.attn.we') for k in sd):
            return False
        gate = self._gated(sd)
        dwc = any(k.endswith('.attn.dwc.weight') for k in sd)
        return gate == self.gate and (gate or dwc == self.dwc)

    def infer(self, sd, opts, extras):
        sizes = _call(infer_timm_vit_sizes, sd)
        dim = sizes['embed_dim']
        blocks = timm_block_indices(sd)
        with_dwc = [i for i in blocks if f'blocks.{i}.attn.dwc.weight' in sd]
        if with_dwc and len(with_dwc) != len(blocks):
            raise ConversionError(f'only blocks {with_dwc} of {len(blocks)} have attn.dwc: '
                                  'MiTA-DeiT +DWC has it in every block')
        proj_in, width = ('qkvg', 4) if self.gate else ('qkv', 3)
        qkv = _need(sd, f'blocks.0.attn.{proj_in}.weight')
        if tuple(qkv.shape) != (width * dim, dim):
            raise ConversionError(f'blocks.0.attn.{proj_in}.weight has shape '
                                  f'{tuple(qkv.shape)}, expected ({width}*{dim}, {dim})')
        heads, p, why = _resolve_heads(dim, f'the embedding width (cls_token, {dim})', opts, 64)
        rec = Recognised(dict(sizes, num_heads=heads, dwc=self.dwc, gate=self.gate,
                              proj_bias='blocks.0.attn.proj.bias' in sd))
        if why and (opts.num_heads is not None or opts.head_dims is not None):
            rec.defaults['num_heads'] = why
        elif why:
            rec.defaults['num_heads'] = (f"{heads}, for DeiT's head width 64 (qkv is 3d x d, "
                                         'no per-head tensor; --num-heads / --head-dims to '
                                         'change)')
        args = extras.get('args')
        saved = {n: getattr(args, n, None) for n in ('pool_size', 'kv_topk')} \
            if args is not None and not self.dwc else {}
        for name, official in (('pool_size', 5), ('kv_topk', None if self.dwc else 5)):
            given, from_args = getattr(opts, name), saved.get(name)
            if given is not None:
                rec.sizes[name] = given
                rec.defaults[name] = f'{given}, given ({ConvertOptions.flag(name)})'
            elif isinstance(from_args, int) and not isinstance(from_args, bool):
                rec.sizes[name] = from_args
                rec.defaults[name] = f"{from_args}, the checkpoint's args.{name}"
            elif official is not None:
                rec.sizes[name] = official
                rec.defaults[name] = (f'{official}, the official value '
                                      f'({ConvertOptions.flag(name)} to change)')
        if self.dwc and opts.kv_topk is None:
            pool = rec.sizes['pool_size']
            rec.defaults['routed keys'] = (f'{pool * pool} = pool_size^2, fixed by '
                                           'MiTA_Attention_Conv (--kv-topk to change)')
        if not self.dwc and not saved:
            rec.notes.append('a timm DeiT without DWC holds the same tensors as MiTA-DeiT; '
                             'converted as MiTA-DeiT')
        return rec

    def convert(self, sd, sizes):
        return _call(convert_mita_deit, sd), {}

    def model_cfg(self, sizes):
        return mita_deit_model_cfg(sizes)

    def base_files(self, configs_root):
        return _deit_bases(configs_root)

    def _arch_sizes(self, sizes):
        return sizes['embed_dim'], sizes['depth'], sizes['num_heads']


# ------------------------------------------------------------------ segmentation kinds
_SEG_HEAD_KEYS = {'depict-sa': 'net.layers.0.fn.proj', 'depict-ca': 'snet.layers.0.fn.proj',
                  'cbt': 'net.layers.0.fn.proj.weight'}
_ENCODER = 'encoder.'


def _decoder_prefix(sd: Mapping[str, Tensor]) -> str:
    return 'decoder.' if any(k.startswith('decoder.') for k in sd) else ''


class SegmenterKind(Kind):
    """Segmenter-style segmentation checkpoints (DEPICT repository; CBSA repository
    ``CBSA_semantic_segmentation``): ``encoder.*`` (Segmenter's timm-style ViT) and
    ``decoder.*`` (DEPICT-SA / DEPICT-CA / CBT decoder, docs/mechanisms.md §3, §4), or
    the decoder alone. Converted to an mmseg ``EncoderDecoder`` with mmseg's
    ``VisionTransformer`` (mmseg's own ``vit2mmseg`` renames) and a ``DEPICTHead`` /
    ``CBTHead``.

    Segmenter's encoder differs from mmseg's Segmenter configs in three settings that
    the written config sets: LayerNorm eps 1e-5 (``nn.LayerNorm``'s default; mmseg:
    1e-6), a biased patch convolution (``patch_bias=True``) and bilinear
    position-embedding resizing.
    """
    scope = 'mmseg'
    base_has_model = True

    def __init__(self, head: str, full: bool) -> None:
        self.head, self.full = head, full
        self.name = f"{head}-{'segmenter' if full else 'decoder'}"
        label = {'depict-sa': 'DEPICT-SA', 'depict-ca': 'DEPICT-CA', 'cbt': 'CBT'}[head]
        section = '§4' if head == 'cbt' else '§3'
        self.title = (f'Segmenter ViT encoder + {label} decoder (docs/mechanisms.md {section})'
                      if full else f'{label} decoder alone (docs/mechanisms.md {section})')
        self.config_dirs = ('cbt', ) if head == 'cbt' else ('depict', )
        self.head_type = 'CBTHead' if head == 'cbt' else 'DEPICTHead'
        opts = {'num_heads', 'head_dims'} | ({'num_reps'} if head == 'cbt' else set())
        self.options = frozenset(opts | ({'encoder_num_heads'} if full else set()))
        self.expected_missing = {} if full else {
            'backbone.': 'the encoder is not in this checkpoint (decoder only)'}

    def match(self, sd):
        has_encoder = any(k.startswith(_ENCODER) for k in sd)
        if has_encoder != self.full:
            return False
        prefix = _decoder_prefix(sd)
        if self.full and not prefix:
            return False
        return prefix + _SEG_HEAD_KEYS[self.head] in sd

    # ---------------------------------------------------------------- sizes
    def _decoder(self, sd, prefix, opts, rec: Recognised) -> dict:
        if self.head == 'cbt':
            step_x = _need(sd, f'{prefix}net.layers.0.fn.step_x')
            rows_key = f'{prefix}net.layers.0.fn.proj.weight'
            _resolve_heads(int(_need(sd, rows_key).shape[0]), rows_key, opts, 100,
                           step_x.numel(), f'{prefix}net.layers.0.fn.step_x')
            config = _call(infer_cbt_decoder_config, sd, prefix, opts.num_reps or 100)
            rec.defaults['decoder.num_reps'] = (
                '100, the official 10x10 representatives (--num-reps to change)'
                if opts.num_reps is None else f'{opts.num_reps}, given (--num-reps)')
            return config
        stack = 'net' if self.head == 'depict-sa' else 'snet'
        rows_key = f'{prefix}{stack}.layers.0.fn.proj'
        heads, p, why = _resolve_heads(int(_need(sd, rows_key).shape[0]), rows_key, opts, 100)
        if why:
            names = 'decoder.n_heads, decoder.dim_head' + (
                ', decoder.ca_dim_head' if self.head == 'depict-ca' else '')
            rec.defaults[names] = why.replace('the official head width',
                                              "the reference's hard-coded head width")
        ca_p = 50
        if self.head == 'depict-ca':
            ca_key = f'{prefix}cnet.layers.0.fn.proj'
            ca_rows = int(_need(sd, ca_key).shape[0])
            if ca_rows % heads:
                raise ConversionError(f'{ca_key} has {ca_rows} rows, not a multiple of the '
                                      f'{heads} heads of {rows_key}')
            ca_p = ca_rows // heads
        return _call(infer_depict_config, sd, prefix, p, ca_p)

    def _encoder(self, sd, opts, rec: Recognised, width: int) -> dict:
        enc = {k[len(_ENCODER):]: v for k, v in sd.items() if k.startswith(_ENCODER)}
        sizes = _call(infer_timm_vit_sizes, enc)
        dim = sizes['embed_dim']
        if dim != width:
            raise ConversionError(f'the encoder is {dim} wide (encoder.cls_token) but the '
                                  f'decoder reads {width}-wide tokens (decoder.cls_emb)')
        heads, _, why = _resolve_heads(dim, f'the encoder width (encoder.cls_token, {dim})',
                                       opts, 64, heads_flag='encoder_num_heads',
                                       dims_flag=None)
        if why and opts.encoder_num_heads is not None:
            rec.defaults['encoder.num_heads'] = why
        elif why:
            rec.defaults['encoder.num_heads'] = (
                f"{heads}, for Segmenter ViT's head width 64 (qkv is 3d x d, no per-head "
                'tensor; --encoder-num-heads to change)')
        hidden = int(enc['blocks.0.mlp.fc1.weight'].shape[0])
        if hidden % dim:
            raise ConversionError(f'the encoder MLP is {hidden} wide, not a multiple of its '
                                  f"width {dim}: mmseg's VisionTransformer cannot express it")
        return dict(img_size=sizes['img_size'], patch_size=sizes['patch_size'],
                    embed_dims=dim, num_layers=sizes['depth'], num_heads=heads,
                    mlp_ratio=hidden // dim)

    def infer(self, sd, opts, extras):
        prefix = _decoder_prefix(sd)
        rec = Recognised({})
        decoder = self._decoder(sd, prefix, opts, rec)
        rec.sizes.update(decoder=decoder, prefix=prefix)
        if self.full:
            rec.sizes['encoder'] = self._encoder(sd, opts, rec, decoder['d_model'])
        else:
            rec.notes.append(
                "the checkpoint holds no encoder: the config's encoder (the inherited "
                "config's, else a 12-layer ViT of the decoder's width) is not the one this "
                'decoder was trained on; set that encoder and its weights before testing')
        return rec

    def describe(self, sizes):
        return self.title

    # ------------------------------------------------------------ conversion
    def convert(self, sd, sizes):
        decoder, prefix = sizes['decoder'], sizes['prefix']
        if prefix:
            fn = convert_cbt_segmenter if self.head == 'cbt' else convert_depict_segmenter
            out = _call(fn, sd, decoder)
        else:
            fn = convert_cbt_decoder if self.head == 'cbt' else convert_depict
            out = _call(fn, sd, decoder, '', 'decode_head.')
        unused = {k: "Segmenter encoder's classification head (mmseg's ViT has none)"
                  for k in sd if k.startswith(_ENCODER)
                  and k[len(_ENCODER):].startswith(ENCODER_DROPPED)}
        return out, unused

    def _head_kwargs(self, sizes) -> dict:
        fn = cbt_head_kwargs_from_reference if self.head == 'cbt' else \
            depict_head_kwargs_from_reference
        return fn(sizes['decoder'])

    def model_cfg(self, sizes):
        d = sizes['decoder']['d_model']
        enc = sizes.get('encoder')
        if enc is not None:
            img = enc['img_size']
            backbone = dict(type='VisionTransformer', img_size=(img, img),
                            patch_size=enc['patch_size'], in_channels=3, embed_dims=d,
                            num_layers=enc['num_layers'], num_heads=enc['num_heads'],
                            mlp_ratio=enc['mlp_ratio'], qkv_bias=True, patch_bias=True,
                            with_cls_token=True, final_norm=True,
                            norm_cfg=dict(type='LN', eps=1e-5, requires_grad=True),
                            interpolate_mode='bilinear', out_indices=-1)
        else:
            # Placeholder encoder of the right width (mmseg's Segmenter ViT settings):
            # the checkpoint holds none; put the encoder it was trained on here.
            img = 512
            heads = max(h for h in range(1, max(1, d // 64) + 1) if d % h == 0)
            backbone = dict(type='VisionTransformer', img_size=(img, img), patch_size=16,
                            in_channels=3, embed_dims=d, num_layers=12, num_heads=heads,
                            mlp_ratio=4, with_cls_token=True, final_norm=True,
                            norm_cfg=dict(type='LN', eps=1e-6, requires_grad=True),
                            interpolate_mode='bicubic', out_indices=-1)
        head = dict(type=self.head_type, **self._head_kwargs(sizes), dropout_ratio=0.0,
                    align_corners=False,
                    loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                                     loss_weight=1.0))
        return dict(
            type='EncoderDecoder',
            data_preprocessor=dict(type='SegDataPreProcessor', mean=[127.5, 127.5, 127.5],
                                   std=[127.5, 127.5, 127.5], bgr_to_rgb=True, pad_val=0,
                                   seg_pad_val=255, size=(img, img)),
            pretrained=None, backbone=backbone, decode_head=head, train_cfg=dict(),
            test_cfg=dict(mode='slide', crop_size=(img, img), stride=(img, img)))

    def base_files(self, configs_root):
        # mmseg's Segmenter recipe (ADE20K, SGD lr 1e-3 poly 160k, batch 8), the
        # reference training of DEPICT and of the CBT decoder; its model is replaced
        return ['mmseg::segmenter/segmenter_vit-s_mask_8xb1-160k_ade20k-512x512.py']

    def needles(self, sizes):
        d = sizes['decoder']['d_model']
        return [(f"'{self.head_type}'", ), (f'in_channels={d}', f'in_channels = {d}')]

    _BACKBONE_ALLOWED = ('img_size', 'norm_cfg', 'interpolate_mode', 'patch_bias')

    def overrides(self, cand_model, full_model):
        if cand_model.get('type') != 'EncoderDecoder':
            return None
        ch, fh = cand_model.get('decode_head') or {}, full_model['decode_head']
        if ch.get('type') != fh['type']:
            return None
        head_cls = SEG_MODELS.get(fh['type'])
        over: Dict[str, Any] = {}
        head_over = {}
        for name in self._head_kwargs_names(fh):
            current = ch.get(name, _default(head_cls, name))
            if _same(current, fh[name]):
                continue
            if name != 'num_classes':
                return None
            head_over[name] = fh[name]
        if head_over:
            over['decode_head'] = head_over
        if self.full:
            cb, fb = cand_model.get('backbone') or {}, full_model['backbone']
            if cb.get('type') != fb['type']:
                return None
            vit = SEG_MODELS.get(fb['type'])
            bb_over = {}
            for name, value in fb.items():
                current = cb.get(name, _default(vit, name))
                if name == 'type' or _same(current, value):
                    continue
                if name not in self._BACKBONE_ALLOWED:
                    return None
                bb_over[name] = value
            if bb_over:
                over['backbone'] = bb_over
            if cand_model.get('pretrained') is not None:
                over['pretrained'] = None
        return over

    @staticmethod
    def _head_kwargs_names(head: Mapping) -> List[str]:
        return [n for n in head if n not in ('type', 'dropout_ratio', 'align_corners',
                                             'loss_decode')]

    def probe(self, model, sizes):
        enc = sizes.get('encoder')
        if enc is not None:
            return model(_probe_image(8 * enc['patch_size']), mode='tensor')
        gen = torch.Generator().manual_seed(0)
        feats = torch.randn(1, sizes['decoder']['d_model'], 8, 8, generator=gen)
        return model.decode_head([feats])


# ------------------------------------------------------------------ attention modules
_ATTENTION_MODULES = (
    ('a CBSA attention module', 'convert_cbsa_attention',
     lambda keys: keys == {'proj.weight', 'step_rep', 'step_x', 'to_out.weight', 'to_out.bias'}),
    ('an MSSA attention module', 'convert_mssa_attention',
     lambda keys: keys == {'qkv.weight', 'to_out.weight', 'to_out.bias'}),
    ('a TSSA attention module', 'convert_tssa_attention',
     lambda keys: keys == {'qkv.weight', 'temp', 'to_out.weight', 'to_out.bias'}),
    ("a softmax-layout attention module (qkv, proj: ViT, MiTA or the CBSA repository's "
     'ViT-adaptation attention)', 'convert_mita_attention for MiTA; the others keep their names',
     lambda keys: {'qkv.weight', 'proj.weight'} <= keys <= {
         'qkv.weight', 'qkv.bias', 'proj.weight', 'proj.bias', 'dwc.weight', 'dwc.bias'}),
)


class AttentionOnly(Kind):
    """A state dict holding one attention module (the reference fixtures
    ``*_attention``): not a released checkpoint; refused with what it is."""
    name = 'attention-only'
    title = 'a single attention module (not a model checkpoint)'

    def _which(self, sd):
        keys = set(sd)
        return next(((what, fn) for what, fn, test in _ATTENTION_MODULES if test(keys)), None)

    def match(self, sd):
        return self._which(sd) is not None

    def infer(self, sd, opts, extras):
        what, fn = self._which(sd)
        raise ConversionError(f'holds {what} ({len(sd)} tensors: {", ".join(sorted(sd))}), '
                              'not a released model checkpoint; attention modules are '
                              f'converted in Python (mmcbsa.converters: {fn})')


for _kind in (WhiteBoxClassifier('CBSA'), WhiteBoxClassifier('MSSA'), WhiteBoxClassifier('TSSA'),
              PrimalClassifier(former=False), PrimalClassifier(former=True),
              MiTADeiT(dwc=False), MiTADeiT(dwc=True), MiTADeiT(dwc=True, gate=True),
              SegmenterKind('depict-sa', True), SegmenterKind('depict-ca', True),
              SegmenterKind('cbt', True), SegmenterKind('depict-sa', False),
              SegmenterKind('depict-ca', False), SegmenterKind('cbt', False), AttentionOnly()):
    register_kind(_kind)
del _kind
