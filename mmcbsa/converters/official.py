"""One conversion for every released checkpoint of the papers mmcbsa implements.

:func:`convert_official_checkpoint` reads a reference checkpoint (weights only), lets
:func:`~mmcbsa.converters.kinds.recognise` find its kind from its own keys and shapes,
converts it, and writes two files:

- ``DST``: an mmengine checkpoint, ``{'state_dict', 'meta': {'converted_from',
  'kind', 'config', 'sizes'}}``;
- ``DST`` with ``.py`` (``model.pth`` -> ``model.py``): a config whose model is exactly
  the checkpoint's, so that ``python tools/test.py DST.py DST`` runs (given the data).

The config inherits the matching config of the repository's ``configs/`` when one has
the checkpoint's sizes, overriding only non-size settings (class count, image size,
``legacy_pooling=True`` for CBSA / MiTA -- the released weights were trained with the
reference's pooling --, the Segmenter encoder's exact LayerNorm eps / patch bias /
position-embedding resizing). It inherits by **absolute path** to the ``configs/``
folder next to the ``mmcbsa`` package in use (a source checkout, installed editable),
so ``DST.py`` works from any directory; moving that checkout means rewriting it. When
no config matches (or ``configs/`` is not there, e.g. a wheel install), the whole model
is written with the sizes read off the tensors, on top of mmpretrain's / mmseg's
dataset, schedule and runtime bases.

Every step is checked before anything is kept: the model built from the sizes
(and later the one built from ``DST.py``) must take every converted tensor with its
shape and leave no parameter unfilled (except what the kind cannot hold, e.g. the
encoder of a decoder-only checkpoint, which the report names); an inherited config
must give the same output as the model built from the sizes on a fixed random input.
"""
import keyword
import os
import os.path as osp
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from torch import Tensor

from mmcbsa.registry import PRETRAIN_MODELS, SEG_MODELS
from .checkpoint_io import ConversionError, read_reference_checkpoint, save_converted
from .kinds import ConvertOptions, Kind, recognise

__all__ = ['ConversionFailed', 'ConversionReport', 'convert_official_checkpoint',
           'configs_root', 'config_path_for']

_REGISTRIES = {'mmseg': SEG_MODELS, 'mmpretrain': PRETRAIN_MODELS}
# Equivalent classifier-head names: mmcbsa's converters write LinearClsHead's
# ``head.fc``; mmpretrain's DeiT configs use VisionTransformerClsHead's ``head.layers.head``.
_HEAD_ALIASES = (('head.fc.', 'head.layers.head.'), )


class ConversionFailed(RuntimeError):
    """The conversion could not be verified (a bug, not a property of the input)."""


@dataclass
class ConversionReport:
    """Everything :func:`convert_official_checkpoint` did, for printing.

    Attributes:
        src / dst / config: the files read and written.
        kind: the recognised :class:`~mmcbsa.converters.kinds.Kind`.
        sizes: the sizes read off the tensors (reference-style config).
        defaults: sizes not stored in the weights, and why each value was used.
        notes: remarks of the kind and of the config writing.
        num_tensors: tensors read; wrappers / stripped_prefix / extras: how they were
            stored (see :class:`~mmcbsa.converters.checkpoint_io.ReferenceCheckpoint`).
        inherited: the ``configs/`` file ``DST.py`` inherits (None: full model written).
        overrides: what ``DST.py`` changes in it.
        unused: ``{source key: why}`` of the tensors not converted.
        not_filled: ``{model key prefix: (count, why)}`` of parameters left unfilled.
        written: tensors written to ``dst``.
    """
    src: str
    dst: str
    config: str
    kind: Kind
    sizes: Dict[str, Any]
    defaults: Dict[str, str]
    notes: List[str]
    num_tensors: int
    wrappers: List[str]
    stripped_prefix: int
    extras: List[str]
    inherited: Optional[str] = None
    overrides: Optional[dict] = None
    unused: Dict[str, str] = field(default_factory=dict)
    not_filled: Dict[str, Tuple[int, str]] = field(default_factory=dict)
    written: int = 0

    def lines(self) -> List[str]:
        """The report as printed by ``official2mmcbsa``."""
        how = []
        if self.wrappers:
            how.append('under ' + '/'.join(repr(w) for w in self.wrappers))
        if self.stripped_prefix:
            how.append(f"'module.' stripped from {self.stripped_prefix} keys")
        if self.extras:
            how.append('also held (not converted): ' + ', '.join(self.extras))
        out = [f'read {self.num_tensors} tensors from {self.src}'
               + (f" ({'; '.join(how)})" if how else '')]
        out.append(f'recognised: {self.kind.name} -- {self.kind.describe(self.sizes)}')
        assumed = {n for names in self.defaults for n in names.split(', ')}
        read = {k: v for k, v in _flat(self.sizes).items() if k not in assumed}
        out.append('sizes read off the tensors: ' +
                   ', '.join(f'{k}={v}' for k, v in read.items()))
        if self.defaults:
            out.append('not stored in the weights: ' +
                       '; '.join(f'{k}: {why}' for k, why in self.defaults.items()))
        out.extend(f'note: {n}' for n in self.notes)
        if self.inherited:
            out.append(f'config: {self.config} inherits {self.inherited}; overrides: '
                       f'{_fmt(self.overrides) if self.overrides else "none"}')
        else:
            out.append(f'config: {self.config} (the whole model: no config of configs/ has '
                       'these sizes)')
        out.append('source keys not used: ' + (
            'none' if not self.unused else
            '; '.join(f'{k} ({why})' for k, why in self.unused.items())))
        out.append('model keys not filled: ' + (
            'none' if not self.not_filled else
            '; '.join(f'{n} under {p} -- {why}' for p, (n, why) in self.not_filled.items())))
        out.append(f'wrote {self.dst} ({self.written} tensors) and {self.config}')
        out.append(f'test: python tools/test.py {self.config} {self.dst}')
        return out


def _flat(value: Mapping, prefix: str = '') -> Dict[str, Any]:
    out = {}
    for k, v in value.items():
        if k == 'prefix':
            continue
        if isinstance(v, Mapping):
            out.update(_flat(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


# ------------------------------------------------------------------------------ paths
def configs_root() -> Optional[str]:
    """The ``configs/`` folder next to the ``mmcbsa`` package in use, or None when
    there is none (a non-editable install)."""
    import mmcbsa
    root = Path(mmcbsa.__file__).resolve().parent.parent / 'configs'
    return str(root) if (root / '_base_').is_dir() else None


def config_path_for(dst: str) -> str:
    """``DST`` with ``.py`` for its extension (``out/cbt.pth`` -> ``out/cbt.py``).

    Raises:
        ConversionError: ``dst`` is itself a ``.py`` file.
    """
    stem, ext = osp.splitext(dst)
    if ext == '.py':
        raise ConversionError(f'{dst}: the checkpoint to write must not be a .py file (the '
                              'config is written next to it, with .py)')
    return stem + '.py'


_QUOTED_PY = re.compile(r'''['"]([^'"\n]+\.py)['"]''')


def _config_text(path: Path, depth: int = 0) -> str:
    """A config file's text with the text of its relative ``_base_`` files (not of
    ``package::`` ones): the cheap look at a candidate before parsing it."""
    text = path.read_text()
    if depth < 4:
        for name in _QUOTED_PY.findall(text):
            base = (path.parent / name).resolve()
            if '::' not in name and base.is_file() and base != path:
                text += '\n' + _config_text(base, depth + 1)
    return text


_CONFIG_CACHE: Dict[Tuple[str, float], Config] = {}


def _load_config(path: str) -> Config:
    """``Config.fromfile`` (cached per file and modification time: parsing a config
    with ``mmpretrain::`` / ``mmseg::`` bases takes most of a second)."""
    key = (path, osp.getmtime(path))
    if key not in _CONFIG_CACHE:
        _CONFIG_CACHE[key] = Config.fromfile(path)
    return _CONFIG_CACHE[key]


def _candidates(kind: Kind, sizes: Mapping, root: Optional[str]) -> List[Path]:
    needles = kind.needles(sizes)
    if root is None or needles is None:
        return []
    found = []
    for folder in kind.config_dirs:
        for path in sorted((Path(root) / folder).glob('*.py')):
            text = _config_text(path)
            if all(any(n in text for n in group) for group in needles):
                found.append(path)
    return found


# ----------------------------------------------------------------------- config text
def _fmt(value: Any, indent: int = 0, width: int = 92) -> str:
    """Python source of a config value, mmengine style (``dict(a=1)``), wrapped."""
    pad = ' ' * (indent + 4)
    if isinstance(value, Mapping):
        first = [k for k in ('_delete_', 'type') if k in value]  # as configs write them
        value = {**{k: value[k] for k in first},
                 **{k: v for k, v in value.items() if k not in first}}
        ident = all(isinstance(k, str) and k.isidentifier() and not keyword.iskeyword(k)
                    for k in value)
        items = [(f'{k}=' if ident else f'{k!r}: ') + _fmt(v, indent + 4, width)
                 for k, v in value.items()]
        opening, closing = ('dict(', ')') if ident else ('{', '}')
    elif isinstance(value, (list, tuple)):
        items = [_fmt(v, indent + 4, width) for v in value]
        opening, closing = ('[', ']') if isinstance(value, list) else ('(', ')')
        if isinstance(value, tuple) and len(value) == 1:
            items[0] += ','
    else:
        return repr(value)
    one_line = opening + ', '.join(items) + closing
    if '\n' not in one_line and indent + len(one_line) <= width:
        return one_line
    return opening + '\n' + ',\n'.join(pad + i for i in items) + closing


def _render(header: List[str], bases: List[str], body: Mapping[str, Any]) -> str:
    lines = [f'# {line}' for line in header]
    lines.append('_base_ = ' + _fmt(list(bases), width=0 if len(bases) > 1 else 92))
    for name, value in body.items():
        lines.append(f'{name} = {_fmt(value)}')
    return '\n'.join(lines) + '\n'


# ------------------------------------------------------------------------ build/load
def _build(model_cfg: Mapping, scope: str) -> torch.nn.Module:
    registry = _REGISTRIES.get(scope)
    if registry is None:
        raise ConversionFailed(f'unsupported default_scope {scope!r}')
    with DefaultScope.overwrite_default_scope(scope):
        try:
            model = registry.build(model_cfg)
        except (ValueError, TypeError, KeyError, AssertionError) as e:
            message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
            raise ConversionError('the sizes read give an impossible model: '
                                  + ' '.join(message.split())) from None
    return model.eval()


def _retarget(state_dict: Mapping[str, Tensor], model_keys) -> Dict[str, Tensor]:
    """Rename equivalent head prefixes (``_HEAD_ALIASES``) to the model's spelling."""
    out = dict(state_dict)
    for ours, theirs in _HEAD_ALIASES:
        if any(k.startswith(theirs) for k in model_keys) and \
                not any(k.startswith(ours) for k in model_keys):
            out = {(theirs + k[len(ours):] if k.startswith(ours) else k): v
                   for k, v in out.items()}
    return out


def _load(model: torch.nn.Module, state_dict: Mapping[str, Tensor]
          ) -> Tuple[List[str], List[str], List[str]]:
    """Load what fits; ``(missing, unexpected, shape mismatches)``."""
    own = model.state_dict()
    bad = [f'{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}'
           for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if bad:
        return [], [], bad
    result = model.load_state_dict(dict(state_dict), strict=False)
    return list(result.missing_keys), list(result.unexpected_keys), []


def _group_missing(missing: List[str], kind: Kind) -> Tuple[Dict[str, Tuple[int, str]],
                                                            List[str]]:
    expected: Dict[str, Tuple[int, str]] = {}
    other = []
    for key in missing:
        prefix = next((p for p in kind.expected_missing if key.startswith(p)), None)
        if prefix is None:
            other.append(key)
        else:
            n, why = expected.get(prefix, (0, kind.expected_missing[prefix]))
            expected[prefix] = (n + 1, why)
    return expected, other


def _close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5))


# ------------------------------------------------------------------------- pipeline
def convert_official_checkpoint(src: str, dst: str,
                                options: Optional[ConvertOptions] = None,
                                root: Optional[str] = 'auto') -> ConversionReport:
    """Convert a released checkpoint and write ``dst`` and its config (see the module
    docstring).

    Args:
        src: the reference checkpoint (any wrapper, ``module.`` prefixes or not).
        dst: the mmengine checkpoint to write; the config goes to
            :func:`config_path_for` ``(dst)``.
        options: sizes the weights do not store (:class:`ConvertOptions`).
        root: the ``configs/`` folder searched for a config to inherit; ``'auto'``:
            :func:`configs_root`; None: never inherit.

    Returns:
        A :class:`ConversionReport`.

    Raises:
        ConversionError: the input is refused (unreadable or not weights-only file,
            unknown kind, attention-only state dict, impossible or contradictory sizes,
            options that contradict the tensors or do not apply).
        ConversionFailed: the written config could not be verified (a bug).
    """
    opts = options or ConvertOptions()
    opts.validate()
    cfg_path = config_path_for(dst)
    if osp.abspath(src) in (osp.abspath(dst), osp.abspath(cfg_path)):
        raise ConversionError(f'{dst}: the output would overwrite the input {src}')
    ckpt = read_reference_checkpoint(src)
    try:
        kind = recognise(ckpt.state_dict)
        kind.check_options(opts)
        rec = kind.infer(ckpt.state_dict, opts, ckpt.extras)
        converted, unused = kind.convert(ckpt.state_dict, rec.sizes)
    except ConversionError as e:
        raise ConversionError(f'{src}: {e}') from None
    report = ConversionReport(src=src, dst=dst, config=cfg_path, kind=kind, sizes=rec.sizes,
                              defaults=rec.defaults, notes=list(rec.notes),
                              num_tensors=len(ckpt.state_dict), wrappers=ckpt.wrappers,
                              stripped_prefix=ckpt.stripped_prefix,
                              extras=list(ckpt.extras), unused=unused)
    del ckpt

    # 1. the model with exactly the sizes read: takes every tensor, gives the reference
    full_cfg = kind.model_cfg(rec.sizes)
    try:
        model = _build(full_cfg, kind.scope)
    except ConversionError as e:
        raise ConversionError(f'{src}: {e}') from None
    missing, unexpected, bad = _load(model, converted)
    if bad:
        raise ConversionError(f'{src}: tensor shapes contradict the sizes read off the '
                              f'checkpoint: {"; ".join(bad[:4])}')
    if unexpected:
        raise ConversionError(f'{src}: {len(unexpected)} tensors have no place in a '
                              f'{kind.name} model: {sorted(unexpected)[:8]}')
    not_filled, other = _group_missing(missing, kind)
    if other:
        raise ConversionError(f'{src}: the checkpoint does not fill {len(other)} parameters '
                              f'of a {kind.name} model: {sorted(other)[:8]}')
    with torch.no_grad():
        reference = kind.probe(model, rec.sizes)
    del model

    # 2. the config: an inherited one when its sizes are the checkpoint's, else the model
    root = configs_root() if root == 'auto' else root
    os.makedirs(osp.dirname(osp.abspath(cfg_path)), exist_ok=True)
    header = [f'Written by tools/model_converters/official2mmcbsa.py from '
              f'{osp.basename(src)}',
              f'kind: {kind.name} -- {kind.describe(rec.sizes)}',
              f'test: python tools/test.py {cfg_path} {dst}']
    chosen = None
    try:
        for cand in _candidates(kind, rec.sizes, root):
            over = kind.overrides(_load_config(str(cand)).model, full_cfg)
            if over is None:
                continue
            body = {'model': over} if over else {}
            result = _check_written(cfg_path, _render(header, [str(cand)], body), kind,
                                    converted, rec.sizes, reference)
            if result is not None:
                chosen = (str(cand), over, result)
                break
        if chosen is None:
            bases = kind.base_files(root)
            body = dict(custom_imports=dict(imports=['mmcbsa'], allow_failed_imports=False),
                        model=dict(_delete_=True, **full_cfg) if kind.base_has_model
                        else full_cfg)
            result = _check_written(cfg_path, _render(header, bases, body), kind, converted,
                                    rec.sizes, reference)
            if result is None:
                raise ConversionFailed(f'{cfg_path}: the written config does not reproduce '
                                       f'the {kind.name} model built from the sizes read')
            chosen = (None, None, result)
    except BaseException:
        if osp.exists(cfg_path):
            os.remove(cfg_path)
        raise
    report.inherited, report.overrides, (final, not_filled, classes_note) = chosen
    report.not_filled = not_filled
    if classes_note is not None:
        report.notes.append(classes_note)
    save_converted(final, dst, src, kind=kind.name, config=osp.abspath(cfg_path),
                   sizes=_plain_meta(rec.sizes))
    report.written = len(final)
    return report


def _plain_meta(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain_meta(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_meta(v) for v in value]
    return value


def _check_written(cfg_path: str, text: str, kind: Kind, converted: Mapping[str, Tensor],
                   sizes: Mapping, reference: Tensor):
    """Write ``text`` to ``cfg_path``, build its model, load the converted tensors and
    compare its probe with ``reference``. Returns ``(state dict in the model's names,
    {prefix: (count, why)} not filled, note on the dataset's class count or None)`` or
    None when the model differs."""
    with open(cfg_path, 'w') as f:
        f.write(text)
    cfg = Config.fromfile(cfg_path)
    model = _build(cfg.model, cfg.get('default_scope') or kind.scope)
    state = _retarget(converted, model.state_dict().keys())
    missing, unexpected, bad = _load(model, state)
    not_filled, other = _group_missing(missing, kind)
    if bad or unexpected or other:
        return None
    with torch.no_grad():
        if not _close(kind.probe(model, sizes), reference):
            return None
    return state, not_filled, _classes_note(cfg, model)


def _classes_note(cfg: Config, model: torch.nn.Module) -> Optional[str]:
    """A note when the config's test dataset has another class count than the model."""
    from mmpretrain.registry import DATASETS as PRETRAIN_DATASETS
    from mmseg.registry import DATASETS as SEG_DATASETS
    registry = SEG_DATASETS if cfg.get('default_scope') == 'mmseg' else PRETRAIN_DATASETS
    dataset = (cfg.get('test_dataloader') or {}).get('dataset') or {}
    classes = (dataset.get('metainfo') or {}).get('classes')
    if classes is None and isinstance(dataset.get('type'), str):
        cls = registry.get(dataset['type'])
        classes = getattr(cls, 'METAINFO', {}).get('classes') if cls is not None else None
    head = getattr(model, 'decode_head', None) or getattr(model, 'head', None)
    n_cls = getattr(head, 'num_classes', None)
    if classes is None or n_cls is None or len(classes) == n_cls:
        return None
    return (f"the config's test dataset ({dataset.get('type')}) has {len(classes)} classes, "
            f'the checkpoint predicts {n_cls}: set the dataset before testing')
