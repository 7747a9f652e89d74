"""mmseg's own segmentor forward test on every mmseg config of configs/.

For each config whose ``default_scope`` is ``mmseg`` (new configs are picked up
automatically), this runs ``_test_encoder_decoder_forward`` from the installed mmseg
test-suite (``tests/test_models/test_forward.py`` of the mmsegmentation wheel, loaded by
path: our tests/ is not a package and must not shadow that top-level ``tests`` package).
That function builds the segmentor, calls ``init_weights``, then runs a training forward
(loss) on two 4×4 images and, in eval mode on one 32×32 image with whole-image
inference, the ``predict`` and ``tensor`` modes with and without ground truth, checking
the shapes against the head's ``num_classes``.

It reads the config relative to mmseg's config folder, so its config loader
(``_get_segmentor_cfg``) is patched to hand it our config's model, prepared as follows
(only to keep the test small on a CPU; nothing here reaches the decode head):

- pretrained downloads off: ``model.pretrained = None`` (mmseg's test does that too) and
  ``model.backbone.init_cfg = None``;
- the encoder cut to its shallowest form with the same widths: one block (ViTs), one
  block per stage (Swin, ConvNeXt), or as many blocks as the ``out_indices`` feeding a
  neck/head need; full-depth ViT-B/L take 4–15 s each just to build and initialise;
- the training batch padded to 64×64 instead of the config's crop (the data
  preprocessor's ``size``): at 512×512 the 150-class cross-entropy alone takes seconds.

The decode head is built exactly as configured (classes, layers, heads, widths,
representatives). The test runs with one intra-op thread (conftest `one_thread`).

Known at the time of writing: the MiTA configs (``cbt/mita-*``) fail here until MiTA
accepts fewer keys than ``topk`` (the 32×32 predict image has 4 or 16 patch tokens for 49
routed keys); that rule is being changed in the MiTA branch.
"""
import copy
import importlib.util
from importlib import metadata
from pathlib import Path
from unittest import mock

import pytest
from mmengine.config import Config
from mmengine.registry import DefaultScope, init_default_scope

CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs'
pytestmark = pytest.mark.usefixtures('one_thread')  # tiny tensors
TRAIN_PAD = (64, 64)


def _mmseg_forward_module():
    """``tests/test_models/test_forward.py`` of the installed mmsegmentation wheel."""
    files = metadata.files('mmsegmentation') or []
    path = next((f.locate() for f in files
                 if str(f) == 'tests/test_models/test_forward.py'), None)
    assert path is not None and Path(path).is_file(), \
        'the installed mmsegmentation has no tests/test_models/test_forward.py'
    spec = importlib.util.spec_from_file_location('mmseg_wheel_test_forward', path)
    module = importlib.util.module_from_spec(spec)
    # Its import runs init_default_scope('mmseg'). This runs in a module-scoped fixture,
    # i.e. before conftest's per-test scope isolation takes its snapshot, so the scope is
    # undone here: left behind, it would make every later mmpretrain build in the session
    # resolve in mmseg's registries.
    saved = DefaultScope._instance_dict.copy()
    try:
        spec.loader.exec_module(module)
    finally:
        DefaultScope._instance_dict.clear()
        DefaultScope._instance_dict.update(saved)
    return module


def _base_scope(path: Path):
    """The package of the first external (``pkg::``) base in the config's ``_base_``
    chain (depth first): the library whose runtime, thus ``default_scope``, the config
    inherits. Read from the ``_base_`` lists only, without loading any config."""
    for base in Config._get_base_files(str(path)):
        if '::' in base:
            return base.partition('::')[0]
        scope = _base_scope(path.parent / base)
        if scope is not None:
            return scope
    return None


def _mmseg_configs():
    files = [p for p in sorted(CONFIG_DIR.rglob('*.py')) if '_base_' not in p.parts]
    params = [pytest.param(p, id=str(p.relative_to(CONFIG_DIR))) for p in files
              if _base_scope(p) == 'mmseg']
    return params or [pytest.param(None, id='no-mmseg-configs-found')]


def _shallow_backbone(backbone) -> None:
    """Cut the encoder to its shallowest form in place, widths unchanged."""
    btype = str(backbone['type']).split('.')[-1]
    outs = backbone.get('out_indices', -1)
    depth = 1 if isinstance(outs, int) else len(outs)
    if not isinstance(outs, int):
        backbone['out_indices'] = tuple(range(depth))
    if btype == 'VisionTransformer' and 'num_layers' in backbone:  # mmseg's ViT
        backbone['num_layers'] = depth
    elif btype == 'VisionTransformer':  # mmpretrain's ViT, arch by name
        from mmpretrain.models import VisionTransformer
        arch = dict(VisionTransformer.arch_zoo[backbone['arch']])
        backbone['arch'] = dict(arch, num_layers=depth)
    elif btype == 'WhiteBoxViT':
        arch = backbone.get('arch', 'cbt-small')
        arch = dict(base=arch) if isinstance(arch, str) else dict(arch)
        backbone['arch'] = dict(arch, num_layers=depth)
    elif btype == 'SwinTransformer':
        backbone['depths'] = (1, ) * len(backbone['depths'])
    elif btype == 'ConvNeXt':
        from mmpretrain.models import ConvNeXt
        arch = backbone['arch']
        arch = dict(ConvNeXt.arch_settings[arch]) if isinstance(arch, str) else dict(arch)
        backbone['arch'] = dict(arch, depths=[1] * len(arch['depths']))


@pytest.fixture(scope='module')
def mmseg_forward():
    return _mmseg_forward_module()


@pytest.mark.parametrize('path', _mmseg_configs())
def test_mmseg_encoder_decoder_forward(path, mmseg_forward):
    assert path is not None, f'no mmseg configs found under {CONFIG_DIR}'
    cfg = Config.fromfile(str(path))  # also imports mmcbsa (custom_imports)
    assert cfg.get('default_scope') == 'mmseg', cfg.get('default_scope')
    model = copy.deepcopy(cfg.model)
    model.pretrained = None
    model.backbone.init_cfg = None
    _shallow_backbone(model.backbone)
    model.data_preprocessor.size = TRAIN_PAD
    head = model.decode_head
    init_default_scope('mmseg')  # what mmseg's test module sets at import (undone per test)
    with mock.patch.object(mmseg_forward, '_get_segmentor_cfg',
                           lambda fname: copy.deepcopy(model)):
        mmseg_forward._test_encoder_decoder_forward(str(path))
    # the head was built as configured
    assert head == cfg.model.decode_head
