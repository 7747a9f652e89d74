"""One conversion for every released checkpoint of the papers mmcbsa implements.

:func:`convert_official_checkpoint` reads a reference checkpoint (weights only), lets
:func:`~mmcbsa.converters.kinds.recognise` find its kind, renames its weights and
writes two files:

- ``DST``: an mmengine checkpoint, ``{'state_dict', 'meta': {'converted_from',
  'kind', 'config', 'sizes'}}``;
- ``DST`` with ``.py`` (``model.pth`` -> ``model.py``): a short config that inherits the
  committed config of the released model (``configs/<family>/...``, by absolute path,
  so it works from any directory) and overrides only what this checkpoint changes: the
  settings its sizes fix where they differ from the release's (a checkpoint of another
  size inherits the kind's default release and overrides its sizes), and the settings
  the released weights were trained with (``legacy_pooling=True`` for CBSA / MiTA, the
  Segmenter encoder's LayerNorm eps / patch bias / position-embedding resizing).

The model built from ``DST.py`` must take every converted tensor with its shape and
leave no parameter unfilled (except what the kind cannot hold, e.g. the encoder of a
decoder-only checkpoint, which the report names) before anything is kept.
"""
import copy
import inspect
import os
import os.path as osp
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from torch import Tensor

from mmcbsa.model_index import index_root
from mmcbsa.models.backbones import WhiteBoxViT
from mmcbsa.registry import PRETRAIN_MODELS, SEG_MODELS
from .checkpoint_io import ConversionError, read_reference_checkpoint, save_converted
from .kinds import Kind, recognise
from .sizes import ConvertOptions, Recognised

__all__ = ['ConversionFailed', 'ConversionReport', 'convert_official_checkpoint',
           'configs_root', 'config_path_for', 'release_overrides']

_REGISTRIES = {'mmseg': SEG_MODELS, 'mmpretrain': PRETRAIN_MODELS}
_MISSING = object()


class ConversionFailed(RuntimeError):
    """The conversion failed for a reason that is not the input's (a broken install)."""


@dataclass
class ConversionReport:
    """What :func:`convert_official_checkpoint` did: the files (``src``, ``dst``,
    ``config``), how ``src`` stored its weights (``stored``), the ``kind`` and what it read
    (``rec``), the release config ``inherited`` and its ``overrides``, the source keys
    ``unused`` and model keys ``not_filled`` (with why), the tensors ``written``."""
    src: str
    dst: str
    config: str
    stored: str
    kind: Kind
    rec: Recognised
    unused: Dict[str, str]
    inherited: str = ''
    overrides: dict = field(default_factory=dict)
    not_filled: Dict[str, Tuple[int, str]] = field(default_factory=dict)
    written: int = 0

    def lines(self) -> List[str]:
        """The report as ``official2mmcbsa`` prints it."""
        assumed = {n for names in self.rec.defaults for n in names.split(', ')}
        read = {k: v for k, v in _flat(self.rec.sizes).items() if k.split('.')[-1] not in assumed}
        out = [f'read {self.stored}', f'recognised: {self.kind.name} -- {self.kind.title}',
               'sizes read off the tensors: ' + ', '.join(f'{k}={v}' for k, v in read.items())]
        if self.rec.defaults:
            out.append('not stored in the weights: ' +
                       '; '.join(f'{k}: {why}' for k, why in self.rec.defaults.items()))
        out += [f'note: {n}' for n in self.rec.notes] + [
            f'config: {self.config} inherits {self.inherited}; overrides: '
            f'{self.overrides or "none"}',
            'source keys not used: ' + ('; '.join(f'{k} ({why})' for k, why in self.unused.items())
                                        or 'none'),
            'model keys not filled: ' + ('; '.join(f'{n} under {p} -- {why}' for p, (n, why)
                                                   in self.not_filled.items()) or 'none'),
            f'wrote {self.dst} ({self.written} tensors) and {self.config}',
            f'test: python tools/test.py {self.config} {self.dst}']
        return out


def _flat(value: Mapping, prefix: str = '') -> Dict[str, Any]:
    out = {}
    for k, v in value.items():
        out.update(_flat(v, f'{prefix}{k}.') if isinstance(v, Mapping) else {prefix + k: v})
    return out


def configs_root() -> str:
    """The ``configs/`` folder of the mmcbsa in use (a checkout's, or the package's
    ``.mim`` copy)."""
    return osp.join(index_root(), 'configs')


def config_path_for(dst: str) -> str:
    """``DST`` with ``.py`` for its extension (``out/cbt.pth`` -> ``out/cbt.py``)."""
    stem, ext = osp.splitext(dst)
    if ext == '.py':
        raise ConversionError(f'{dst}: the checkpoint to write must not be a .py file (the '
                              'config is written next to it, with .py)')
    return stem + '.py'


_CONFIG_CACHE: Dict[Tuple[str, float], Config] = {}


def _load_config(path: str) -> Config:
    """``Config.fromfile``, cached per file and modification time (a config with
    ``mmpretrain::`` / ``mmseg::`` bases takes most of a second to parse)."""
    key = (path, osp.getmtime(path))
    if key not in _CONFIG_CACHE:
        _CONFIG_CACHE[key] = Config.fromfile(path)
    return _CONFIG_CACHE[key]


# --------------------------------------------------------------------------- overrides
def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _class(cfg: Any, scope: str) -> Optional[type]:
    kind = cfg.get('type') if isinstance(cfg, Mapping) else None
    return _REGISTRIES[scope].get(kind) if isinstance(kind, str) else None


def _default(cls: Optional[type], name: str) -> Any:
    param = inspect.signature(cls.__init__).parameters.get(name) if cls else None
    return _MISSING if param is None or param.default is param.empty else param.default


def _diff(want: Mapping, have: Any, scope: str, cls: Optional[type] = None) -> dict:
    """The entries of ``want`` that differ from ``have`` (a config value, whose missing
    keys take ``cls``'s constructor defaults); sub-dicts of the same type recursively
    (their classes looked up in ``scope``'s registry); a sub-dict of another type
    replaces the release's (``_delete_``) instead of merging into it."""
    out = {}
    for key, value in want.items():
        current = have.get(key, _MISSING) if isinstance(have, Mapping) else _MISSING
        current = _default(cls, key) if current is _MISSING else current
        if isinstance(value, Mapping) and isinstance(current, Mapping) and \
                value.get('type', current.get('type')) == current.get('type'):
            sub = _diff(value, current, scope, _class(current, scope))
            if sub:
                out[key] = sub
        elif isinstance(value, Mapping) and isinstance(current, Mapping):
            out[key] = dict(_delete_=True, **value)
        elif _plain(value) != _plain(current):
            out[key] = value
    return out


def release_overrides(kind: Kind, sizes: Mapping[str, Any], release_model: Mapping) -> dict:
    """What a config inheriting ``release_model`` overrides to get ``kind.model(sizes)``:
    the differing entries only; a differing WhiteBoxViT ``arch`` is written whole."""
    want = copy.deepcopy(kind.model(sizes))
    arch = want.get('backbone', {}).pop('arch', None)
    scope = kind.scope
    out = _diff(want, release_model, scope, _class(release_model, scope))
    if arch is not None:
        have = (release_model.get('backbone') or {}).get('arch', _default(WhiteBoxViT, 'arch'))
        resolved = WhiteBoxViT.resolve_arch(arch)
        if _diff(resolved, WhiteBoxViT.resolve_arch(have), scope) or \
                set(WhiteBoxViT.resolve_arch(have)) - set(resolved):
            out['backbone'] = dict(arch=dict(_delete_=True, **arch), **out.get('backbone', {}))
    return out


# ------------------------------------------------------------------------ build/load
def _build(model_cfg: Mapping, scope: str) -> torch.nn.Module:
    with DefaultScope.overwrite_default_scope(scope):
        try:
            model = _REGISTRIES[scope].build(model_cfg)
        except (ValueError, TypeError, KeyError, AssertionError) as e:
            message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
            raise ConversionError('the sizes read give an impossible model: '
                                  + ' '.join(message.split())) from None
    return model.eval()


def _check_loads(model: torch.nn.Module, state: Mapping[str, Tensor],
                 kind: Kind) -> Dict[str, Tuple[int, str]]:
    """Load ``state`` into ``model``; ``{prefix: (count, why)}`` of the parameters it
    leaves unfilled as the kind expects. Anything else is a :class:`ConversionError`."""
    own = model.state_dict()
    bad = [f'{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}'
           for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ConversionError('tensor shapes contradict the sizes read off the checkpoint: '
                              + '; '.join(bad[:4]))
    result = model.load_state_dict(dict(state), strict=False)
    if result.unexpected_keys:
        raise ConversionError(f'{len(result.unexpected_keys)} tensors have no place in a '
                              f'{kind.name} model: {sorted(result.unexpected_keys)[:8]}')
    expected: Dict[str, Tuple[int, str]] = {}
    other = []
    for key in result.missing_keys:
        prefix = next((p for p in kind.expected_missing if key.startswith(p)), None)
        if prefix is None:
            other.append(key)
        else:
            n, why = expected.get(prefix, (0, kind.expected_missing[prefix]))
            expected[prefix] = (n + 1, why)
    if other:
        raise ConversionError(f'the checkpoint does not fill {len(other)} parameters '
                              f'of a {kind.name} model: {sorted(other)[:8]}')
    return expected


# ------------------------------------------------------------------------- pipeline
def convert_official_checkpoint(src: str, dst: str,
                                options: Optional[ConvertOptions] = None) -> ConversionReport:
    """Convert a released checkpoint and write ``dst`` and its config (see the module
    docstring).

    Args:
        src: the reference checkpoint (any wrapper, ``module.`` prefixes or not).
        dst: the mmengine checkpoint to write; the config goes to
            :func:`config_path_for` ``(dst)``.
        options: sizes the weights do not store (:class:`ConvertOptions`).

    Raises:
        ConversionError: the input is refused (unreadable or not weights-only file,
            unknown kind, attention-only state dict, impossible or contradictory sizes,
            options that contradict the tensors or do not apply).
        ConversionFailed: no release config of the kind is there (a broken install).
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
    how = (['under ' + '/'.join(map(repr, ckpt.wrappers))] if ckpt.wrappers else []) + (
        [f"'module.' stripped from {ckpt.stripped_prefix} keys"] if ckpt.stripped_prefix
        else []) + (['also held (not converted): ' + ', '.join(ckpt.extras)]
                    if ckpt.extras else [])
    stored = f'{len(ckpt.state_dict)} tensors from {src}' + (f" ({'; '.join(how)})" if how
                                                             else '')
    report = ConversionReport(src, dst, cfg_path, stored, kind, rec, unused)
    del ckpt

    root = configs_root()
    found = [osp.join(root, r) for r in kind.releases(rec.sizes)
             if osp.isfile(osp.join(root, r))]
    if not found:
        raise ConversionFailed(f'none of the {kind.name} release configs '
                               f'{kind.releases(rec.sizes)} is in {root}')
    release = osp.realpath(found[0])
    try:
        over = release_overrides(kind, rec.sizes, _load_config(release).model)
    except (ValueError, TypeError) as e:
        raise ConversionError(f'{src}: the sizes read give an impossible model: {e}') from None
    body = dict(_base_=[release], **({'model': over} if over else {}))
    text = '\n'.join([  # mmengine's own config writer
        f'# Written by tools/model_converters/official2mmcbsa.py from {osp.basename(src)}',
        f'# kind: {kind.name} -- {kind.title}', f'# test: python tools/test.py {cfg_path} {dst}',
        Config(body).pretty_text])
    os.makedirs(osp.dirname(osp.abspath(cfg_path)), exist_ok=True)
    with open(cfg_path, 'w') as f:
        f.write(text)
    try:
        cfg = Config.fromfile(cfg_path)
        model = _build(cfg.model, cfg.get('default_scope') or kind.scope)
        report.not_filled = _check_loads(model, converted, kind)
    except ConversionError as e:
        os.remove(cfg_path)
        raise ConversionError(f'{src}: {e}') from None
    except BaseException:
        os.remove(cfg_path)
        raise
    report.inherited, report.overrides = release, over
    note = _classes_note(cfg, model)
    if note:
        rec.notes.append(note)
    save_converted(converted, dst, src, kind=kind.name, config=osp.abspath(cfg_path),
                   sizes=rec.sizes)
    report.written = len(converted)
    return report


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
