"""mmcbsa's decode heads and backbones mixed with the OpenMMLab zoo, through the
shipped configs: every segmentation config under configs/mixing/ and configs/cbt/
builds and trains / predicts (whole and slide) on small non-square images.

Each config is loaded as users load it (``Config.fromfile``: ``mmseg::`` bases,
``custom_imports``); only the depths (and, for the multi-level CBT-S backbone, the
returned blocks) and the widths of mmseg's own UPer/FCN heads are reduced in the
test; backbone widths, mmcbsa heads and class counts stay the config's.
"""
import copy
from pathlib import Path

import pytest
import torch
from mmengine.config import Config, ConfigDict
from mmengine.registry import init_default_scope
from seg_helpers import seg_samples

CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs'


def _seg_configs(folder):
    # segmentation configs are named after their dataset (configs/cbt also holds
    # ImageNet classification configs); the test checks the scope
    files = sorted((CONFIG_DIR / folder).glob('*ade20k*.py'))
    params = [pytest.param(p, id=f'{folder}/{p.stem}') for p in files]
    return params or [pytest.param(None, id=f'no-seg-configs-in-{folder}')]


def _shrink(model_cfg: ConfigDict) -> None:
    """Fewer blocks per backbone, narrower mmseg UPer/FCN heads; mmcbsa's heads and
    every backbone width unchanged."""
    if model_cfg.decode_head.type == 'UPerHead':
        model_cfg.decode_head.channels = 64
    if model_cfg.get('auxiliary_head') is not None:
        model_cfg.auxiliary_head.channels = 32
    bb = model_cfg.backbone
    t = bb.type
    if t == 'VisionTransformer':  # mmseg's (Segmenter encoders)
        bb.num_layers = 1
    elif t == 'SwinTransformer':
        bb.depths = [1] * len(bb.depths)
    elif t == 'mmpretrain.ConvNeXt':
        from mmpretrain.models import ConvNeXt
        channels = ConvNeXt.arch_settings[bb.arch]['channels']
        bb.arch = dict(depths=[1] * len(channels), channels=channels)
    elif t == 'mmpretrain.VisionTransformer':
        from mmpretrain.models import VisionTransformer
        arch = dict(VisionTransformer.arch_zoo[bb.arch])
        bb.arch = dict(arch, num_layers=1)
    elif t == 'WhiteBoxViT':
        outs = bb.get('out_indices', -1)
        n_out = 1 if isinstance(outs, int) else len(outs)
        arch = bb.arch if isinstance(bb.arch, dict) else dict(base=bb.arch)
        bb.arch = dict(arch, num_layers=n_out)
        if n_out > 1:
            bb.out_indices = list(range(n_out))
    else:
        raise AssertionError(f'test does not know how to shrink backbone {t}')


def _check_config(path):
    assert path is not None, 'no segmentation configs found'
    from mmseg.registry import MODELS
    cfg = Config.fromfile(str(path))
    assert cfg.default_scope == 'mmseg'
    assert 'mmcbsa' in cfg.custom_imports['imports']
    init_default_scope('mmseg')
    model_cfg = copy.deepcopy(cfg.model)
    _shrink(model_cfg)
    model_cfg.data_preprocessor = None  # tensors go straight to loss / predict
    torch.manual_seed(0)
    model = MODELS.build(model_cfg)
    num_classes = model.decode_head.num_classes
    assert num_classes == cfg.model.decode_head.num_classes == 150
    # small on purpose: the MiTA segmenters (k = 49 routed keys) see 36 tokens per
    # image and 20 per slide window, fewer than k (issue 11)
    h, w = 70, 102

    model.train()
    losses = model.loss(torch.randn(2, 3, h, w), seg_samples(2, h, w, num_classes))
    loss = sum(v for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.decode_head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.backbone.parameters())

    # slide inference over 2x2 overlapping windows (whole-image inference is the
    # loss' forward pass above, and is tested per head in test_*_head.py)
    model.eval()
    model.test_cfg = ConfigDict(mode='slide', crop_size=(h * 3 // 4, w * 3 // 4),
                                stride=(h // 2, w // 2))
    with torch.no_grad():
        res = model.predict(torch.randn(1, 3, h, w), seg_samples(1, h, w, num_classes))
    assert res[0].seg_logits.data.shape == (num_classes, h, w)
    assert res[0].pred_sem_seg.data.shape == (1, h, w)
    assert torch.isfinite(res[0].seg_logits.data).all()
    return cfg, model


@pytest.mark.parametrize('path', _seg_configs('mixing'))
def test_mixing_config_trains_and_predicts(path):
    cfg, model = _check_config(path)
    head, bb = cfg.model.decode_head, cfg.model.backbone
    if head.type in ('DEPICTHead', 'CBTHead'):
        # several backbone levels through in_index / resize_concat + the projection
        if head.get('input_transform') == 'resize_concat':
            assert model.decode_head.input_proj.in_features == sum(head.in_channels)
    if bb.type == 'WhiteBoxViT':
        assert cfg.model.neck.type == 'MultiLevelNeck'
        assert len(bb.out_indices) == len(cfg.model.neck.in_channels) == 4


@pytest.mark.parametrize('path', _seg_configs('cbt'))
def test_cbt_segmentation_config_trains_and_predicts(path):
    cfg, model = _check_config(path)
    assert cfg.model.decode_head.type == 'CBTHead'
    attn = model.decode_head.layers[0].attn
    assert type(attn).__name__ == 'CBSA'
    if cfg.model.backbone.type == 'WhiteBoxViT':
        encoder = model.backbone.layers[0].attn
        if 'mita' in path.name:  # the MiTA segmenters
            assert type(encoder).__name__ == 'MiTA'
            assert encoder.num_landmarks == 49 and encoder.topk == 49  # mechanisms.md §5
        else:  # the fully linear CBT-S + CBT head: CBSA in encoder and decoder
            assert type(encoder).__name__ == 'CBSA' and encoder.num_reps == 64


def test_mixing_configs_cover_the_zoo():
    """The brief's combinations are all present: both heads on Swin-T, ConvNeXt-T and
    mmpretrain's ViT, and a CBT-S backbone under UPerHead."""
    seen = set()
    for p in (CONFIG_DIR / 'mixing').glob('*.py'):
        cfg = Config.fromfile(str(p))
        seen.add((cfg.model.backbone.type, cfg.model.decode_head.type))
    for bb in ('SwinTransformer', 'mmpretrain.ConvNeXt', 'mmpretrain.VisionTransformer'):
        for head in ('DEPICTHead', 'CBTHead'):
            assert (bb, head) in seen, (bb, head)
    assert ('WhiteBoxViT', 'UPerHead') in seen
