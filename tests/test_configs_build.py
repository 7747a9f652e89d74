"""Every config under configs/ (``_base_`` folders excepted) parses and its model
builds in the registry of the config's ``default_scope`` (mmseg or mmpretrain); a
config trains with mixed precision exactly when its name says ``-amp-`` (mmseg's
convention).

Build only: ``init_weights`` is never called, so no pretrained checkpoint (URLs in
``pretrained`` / ``init_cfg``) is downloaded. New config folders are covered
automatically.
"""
from pathlib import Path

import pytest
import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import init_default_scope

CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs'
AMP_WRAPPERS = ('AmpOptimWrapper', 'BF16AmpOptimWrapper')


def _config_files():
    files = sorted(p for p in CONFIG_DIR.rglob('*.py') if '_base_' not in p.parts)
    if not files:
        return [pytest.param(None, id='no-configs-found')]
    return [pytest.param(p, id=str(p.relative_to(CONFIG_DIR))) for p in files]


def _models_registry(scope: str):
    if scope == 'mmseg':
        from mmseg.registry import MODELS
    elif scope == 'mmpretrain':
        from mmpretrain.registry import MODELS
    else:
        raise AssertionError(f"default_scope must be 'mmseg' or 'mmpretrain', got {scope!r}")
    return MODELS


@pytest.mark.parametrize('path', _config_files())
def test_config_builds(path):
    assert path is not None, f'no configs found under {CONFIG_DIR}'
    cfg = Config.fromfile(str(path))  # also runs custom_imports (imports mmcbsa)
    imports = cfg.get('custom_imports', {})
    assert 'mmcbsa' in imports.get('imports', []), 'config must import mmcbsa'
    assert imports.get('allow_failed_imports') is False
    amp = cfg.get('optim_wrapper', {}).get('type') in AMP_WRAPPERS
    assert amp == ('-amp-' in path.name), \
        f"optim_wrapper {cfg.get('optim_wrapper', {}).get('type')!r}: the name must say " \
        f"'-amp-' exactly when the config trains with mixed precision"
    scope = cfg.get('default_scope')
    init_default_scope(scope)
    model = _models_registry(scope).build(cfg.model)
    assert isinstance(model, nn.Module)
    assert sum(p.numel() for p in model.parameters()) > 0
