"""One conversion for every released checkpoint of the papers mmcbsa implements.

:func:`convert_official_checkpoint` reads a reference checkpoint (weights only), finds its
kind (:func:`~mmcbsa.converters.kinds.recognise`), renames its weights and writes ``DST``,
an mmengine checkpoint (``{'state_dict', 'meta': {'converted_from', 'kind', 'config',
'sizes'}}``), and ``DST`` with ``.py``: a short config that inherits the committed config
of the released model (``configs/...``, by absolute path) and overrides only what this
checkpoint changes: the sizes that differ from the release's (a checkpoint of another
size inherits the kind's small release) and the settings the released weights were
trained with (``legacy_pooling=True`` for CBSA / MiTA, the Segmenter encoder's LayerNorm
eps / patch bias / position-embedding resizing). The model built from that config must
take every converted tensor with its shape and leave no parameter unfilled (except what
the kind expects, e.g. the encoder of a decoder-only checkpoint) before anything is kept.
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

from mmcbsa.engine.weights import class_count_problem, fit_problem
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
    (``rec``), the source keys ``unused`` and model keys ``not_filled`` (with why), the
    release config ``inherited`` and its ``overrides``, the tensors ``written``."""
    src: str
    dst: str
    config: str
    stored: str
    kind: Kind
    rec: Recognised
    unused: Dict[str, str]
    not_filled: Dict[str, Tuple[int, str]] = field(default_factory=dict)
    inherited: str = ''
    overrides: dict = field(default_factory=dict)
    written: int = 0

    def lines(self) -> List[str]:
        """The report as ``official2mmcbsa`` prints it."""
        assumed = {n for names in self.rec.defaults for n in names.split(', ')}
        read = ', '.join(f'{k}={v}' for k, v in _flat(self.rec.sizes).items()
                         if k.split('.')[-1] not in assumed)
        out = [f'read {self.stored}', f'recognised: {self.kind.name} -- {self.kind.title}',
               f'sizes read off the tensors: {read}']
        if self.rec.defaults:
            out.append('not stored in the weights: ' +
                       '; '.join(f'{k}: {why}' for k, why in self.rec.defaults.items()))
        unused = '; '.join(f'{k} ({why})' for k, why in self.unused.items())
        missing = '; '.join(f'{n} under {p} -- {why}' for p, (n, why) in self.not_filled.items())
        return out + [f'note: {n}' for n in self.rec.notes] + [
            f'config: {self.config} inherits {self.inherited}; overrides: '
            f'{self.overrides or "none"}', f'source keys not used: {unused or "none"}',
            f'model keys not filled: {missing or "none"}',
            f'wrote {self.dst} ({self.written} tensors) and {self.config}',
            f'test: python tools/test.py {self.config} {self.dst}']


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
    if dst.endswith(('/', os.sep)) or osp.isdir(dst):
        raise ConversionError(f'{dst} is a directory: give the checkpoint to write as a file '
                              f'name, e.g. {osp.join(dst, "model.pth")}')
    stem, ext = osp.splitext(dst)
    if ext == '.py':
        raise ConversionError(f'{dst}: the checkpoint to write must not be a .py file (the '
                              'config is written next to it, with .py)')
    return stem + '.py'


# --------------------------------------------------------------------------- overrides
def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


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
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            if value.get('type', current.get('type')) != current.get('type'):
                out[key] = dict(_delete_=True, **value)
            elif _diff(value, current, scope, _class(current, scope)):
                out[key] = _diff(value, current, scope, _class(current, scope))
        elif _plain(value) != _plain(current):
            out[key] = value
    return out


def release_overrides(kind: Kind, sizes: Mapping[str, Any], release_model: Mapping) -> dict:
    """What a config inheriting ``release_model`` overrides to get ``kind.model(sizes)``:
    the differing entries only; a differing WhiteBoxViT ``arch`` is written whole."""
    want = copy.deepcopy(kind.model(sizes))
    arch = want.get('backbone', {}).pop('arch', None)
    out = _diff(want, release_model, kind.scope, _class(release_model, kind.scope))
    if arch is not None:
        have = WhiteBoxViT.resolve_arch((release_model.get('backbone') or {}).get(
            'arch', _default(WhiteBoxViT, 'arch')))
        resolved = WhiteBoxViT.resolve_arch(arch)
        if _diff(resolved, have, kind.scope) or set(have) - set(resolved):
            out['backbone'] = dict(arch=dict(_delete_=True, **arch), **out.get('backbone', {}))
    return out


# ------------------------------------------------------------------------ build/load
def _build_and_load(cfg: Config, state: Mapping[str, torch.Tensor],
                    kind: Kind) -> Tuple[torch.nn.Module, Dict[str, Tuple[int, str]]]:
    """Build ``cfg.model`` and load ``state``: the model and ``{prefix: (count, why)}`` of
    the parameters it leaves unfilled as the kind expects; anything else (an impossible
    model, a shape, an extra or missing tensor) is a :class:`ConversionError`."""
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope') or kind.scope):
        try:
            model = _REGISTRIES[kind.scope].build(cfg.model).eval()
        except (ValueError, TypeError, KeyError, AssertionError) as e:
            message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
            raise ConversionError('the sizes read give an impossible model: '
                                  + ' '.join(message.split())) from None
    problem = fit_problem(model, state, allow_missing=tuple(kind.expected_missing))
    if problem:
        raise ConversionError(f'the converted weights do not fit a {kind.name} model of the '
                              f'sizes read off the checkpoint: {problem}')
    model.load_state_dict(dict(state), strict=False)
    unfilled = [k for k in model.state_dict() if k not in state]
    expected = {p: (n, why) for p, why in kind.expected_missing.items()
                if (n := sum(k.startswith(p) for k in unfilled))}
    return model, expected


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
            unknown kind, a single attention module, impossible or contradictory sizes,
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
    how = ([f"under {'/'.join(map(repr, ckpt.wrappers))}"] if ckpt.wrappers else []) + (
        [f"'module.' stripped from {ckpt.stripped_prefix} keys"] if ckpt.stripped_prefix
        else []) + ([f"also held (not converted): {', '.join(ckpt.extras)}"]
                    if ckpt.extras else [])
    stored = f'{len(ckpt.state_dict)} tensors from {src}' + (f" ({'; '.join(how)})" * bool(how))
    report = ConversionReport(src, dst, cfg_path, stored, kind, rec, unused)
    del ckpt

    root = configs_root()
    found = [osp.join(root, r) for r in kind.releases(rec.sizes) if osp.isfile(osp.join(root, r))]
    if not found:
        raise ConversionFailed(f'none of the {kind.name} release configs '
                               f'{kind.releases(rec.sizes)} is in {root}')
    report.inherited = release = osp.realpath(found[0])
    try:
        over = release_overrides(kind, rec.sizes, Config.fromfile(release).model)
    except (ValueError, TypeError) as e:
        raise ConversionError(f'{src}: the sizes read give an impossible model: {e}') from None
    report.overrides = over
    os.makedirs(osp.dirname(osp.abspath(cfg_path)), exist_ok=True)
    with open(cfg_path, 'w') as f:  # mmengine's own config writer
        f.write('\n'.join([
            f'# Written by tools/model_converters/official2mmcbsa.py from {osp.basename(src)}',
            f'# kind: {kind.name} -- {kind.title}',
            f'# test: python tools/test.py {cfg_path} {dst}',
            Config(dict(_base_=[release], **({'model': over} if over else {}))).pretty_text]))
    try:
        cfg = Config.fromfile(cfg_path)
        model, report.not_filled = _build_and_load(cfg, converted, kind)
    except BaseException as e:
        os.remove(cfg_path)
        if isinstance(e, ConversionError):
            raise ConversionError(f'{src}: {e}') from None
        raise
    rec.notes += [n for n in [class_count_problem(cfg, model)] if n]
    save_converted(converted, dst, src, kind=kind.name, config=osp.abspath(cfg_path),
                   sizes=rec.sizes)
    report.written = len(converted)
    return report
