"""DEPICT decode heads (docs/mechanisms.md §3): official parity, an in-test reference, mmseg
integration (loss / whole + slide predict at awkward image sizes), gradients,
converters and build-time errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import fixture_params, load_fixture
from reference_configs import depict_head
from mmseg.registry import MODELS
from seg_helpers import (check_head_matches_fixture, check_resize_concat_head,
                         check_segmentor_loss_and_grads, check_segmentor_predict,
                         layer_norm_ref, randomise_layer_norms, seg_samples,
                         tiny_vit_segmentor)

import mmcbsa  # noqa: F401  (registers DEPICTHead)
from mmcbsa.converters import KINDS, ConvertOptions, convert_depict, convert_segmenter

TOL = 1e-4


def build_head(**kwargs):
    cfg = dict(type='DEPICTHead', in_channels=24, channels=24, num_classes=5, num_layers=2,
               num_heads=2, head_dims=8, ca_head_dims=4, loss_decode=dict(
                   type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0))
    cfg.update(kwargs)
    return MODELS.build(cfg)


# --------------------------------------------------------------------------- parity
@pytest.mark.parametrize('path', fixture_params('depict_'))
def test_official_parity(path):
    fx = load_fixture(path)
    cfg = fx['config']
    head = MODELS.build(depict_head(cfg))
    head.load_state_dict(convert_depict(fx['state_dict']), strict=True)
    head.eval()
    check_head_matches_fixture(head, fx, TOL)  # (B, hw, d) row-major patch tokens


def test_sizes_read_off_the_tensors_match_the_fixture_config():
    for path in [p.values[0] for p in fixture_params('depict_')]:
        fx = load_fixture(path)
        kind = KINDS[f"depict-{fx['config']['mode']}-decoder"]
        sizes = kind.infer(fx['state_dict'], ConvertOptions(), {}).sizes['decode_head']
        assert dict(sizes, type='DEPICTHead') == depict_head(fx['config']), path.stem


# ------------------------------------------------------------ in-test reference
def _mssa(q_src, kv_src, U, gamma, heads):
    """softmax(q_h k_hᵀ/√p) k_h per head, then γ · concat · U (docs/mechanisms.md §3), by
    loops."""
    q, k = q_src @ U.t(), kv_src @ U.t()
    p = U.shape[0] // heads
    outs = []
    for i in range(heads):
        qh, kh = q[..., i * p:(i + 1) * p], k[..., i * p:(i + 1) * p]
        a = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(p), dim=-1)
        outs.append(a @ kh)
    return gamma * (torch.cat(outs, -1) @ U)


def reference_depict(head, feat, heads, ca_heads=None):
    """Plain re-statement of docs/mechanisms.md §3 on the head's parameters, patches first like
    the official code."""
    b, c_in, h, w = feat.shape
    x = feat.flatten(2).transpose(1, 2)
    if c_in != head.channels:
        x = x @ head.input_proj.weight.t() + head.input_proj.bias
    cls = head.cls_emb.expand(b, -1, -1)
    n_cls = cls.shape[1]
    if head.mode == 'sa':
        t = torch.cat([x, cls], 1)
        for layer in head.layers:
            z = layer_norm_ref(t, layer.norm)
            t = t + _mssa(z, z, layer.attn.in_proj.weight, layer.attn.step_size, heads)
        t = layer_norm_ref(t, head.decoder_norm)
        patches, cls = t[:, :-n_cls], t[:, -n_cls:]
    else:
        for layer in head.layers:
            z = layer_norm_ref(x, layer.norm)
            x = x + _mssa(z, z, layer.attn.in_proj.weight, layer.attn.step_size, heads)
        patches = layer_norm_ref(x, head.decoder_norm)
        for layer in head.cross_layers:
            z = layer_norm_ref(patches, layer.norm)
            cls = cls + _mssa(cls, z, layer.attn.in_proj.weight, layer.attn.step_size, ca_heads)
        cls = layer_norm_ref(cls, head.cross_norm)
    patches = patches / patches.norm(dim=-1, keepdim=True)
    cls = cls / cls.norm(dim=-1, keepdim=True)
    masks = layer_norm_ref(patches @ cls.transpose(1, 2), head.mask_norm)
    return masks.transpose(1, 2).reshape(b, n_cls, h, w)


@pytest.mark.parametrize('mode', ['sa', 'ca'])
@pytest.mark.parametrize('in_channels', [24, 40])
def test_matches_in_test_reference_non_square(mode, in_channels):
    torch.manual_seed(0)
    head = build_head(mode=mode, in_channels=in_channels, num_heads=3, ca_num_heads=2).eval()
    randomise_layer_norms(head)
    # float64: the class-axis LayerNorm of nearly equal cosine scores (CA classes all
    # read the same patches) amplifies float32 rounding to ~1e-5.
    head.double()
    feat = torch.randn(2, in_channels, 3, 7, dtype=torch.float64)  # non-square grid
    with torch.no_grad():
        out = head([feat])
        ref = reference_depict(head, feat, heads=3, ca_heads=2)
    assert out.shape == (2, 5, 3, 7)
    assert (out - ref).abs().max().item() <= 1e-10
    assert isinstance(head.input_proj, torch.nn.Identity) == (in_channels == 24)


def test_paper_defaults():
    head = MODELS.build(dict(type='DEPICTHead', in_channels=192, channels=192, num_classes=150,
                             mode='ca'))
    assert len(head.layers) == 3 and len(head.cross_layers) == 3
    assert head.layers[0].attn.num_heads == 3 and head.layers[0].attn.head_dims == 100
    assert head.cross_layers[0].attn.num_heads == 3
    assert head.cross_layers[0].attn.head_dims == 50
    assert head.layers[0].attn.out_proj_mode == 'tied'
    assert not hasattr(head, 'conv_seg')


def test_init_statistics():
    torch.manual_seed(0)
    d = 256
    head = build_head(in_channels=d, channels=d, num_classes=400, head_dims=100, num_heads=3)
    u = head.layers[0].attn.in_proj.weight
    assert abs(u.std().item() * math.sqrt(d) - 1.0) < 0.03  # N(0, 1)/√d
    cls = head.cls_emb
    # timm-style trunc_normal_(std=0.02): bounds ±2 absolute, like the reference
    assert abs(cls.mean().item()) < 0.002
    assert abs(cls.std().item() - 0.02) < 0.002


# --------------------------------------------------------- multi-level / gradients
def test_multi_level_resize_concat():
    torch.manual_seed(0)
    check_resize_concat_head(build_head)


# ----------------------------------------------------------------- mmseg segmentor
def _segmentor(mode, test_cfg=None, in_index=-1, num_classes=4):
    """Tiny mmseg ViT (width 24) + DEPICT head (16 channels) in ``mode``."""
    return tiny_vit_segmentor(
        dict(type='DEPICTHead', in_channels=24, channels=16, num_classes=num_classes,
             mode=mode, num_layers=2, num_heads=2, head_dims=8, ca_head_dims=4,
             in_index=in_index,
             loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
        test_cfg)


@pytest.mark.parametrize('mode', ['sa', 'ca'])
def test_segmentor_loss_and_gradients_non_divisible(mode):
    torch.manual_seed(0)
    # 43x61: not multiples of the patch size 8, non-square
    check_segmentor_loss_and_grads(_segmentor(mode), (43, 61), num_classes=4)


@pytest.mark.parametrize('mode', ['sa', 'ca'])
@pytest.mark.parametrize('test_cfg', [dict(mode='whole'),
                                      dict(mode='slide', crop_size=(32, 32), stride=(24, 24))])
def test_segmentor_predict(mode, test_cfg):
    torch.manual_seed(0)
    check_segmentor_predict(_segmentor(mode, test_cfg), (45, 70), num_classes=4)


def test_masks_upsampled_by_base_head():
    """Loss uses BaseDecodeHead's bilinear resize of the (B, n_cls, h, w) masks."""
    torch.manual_seed(0)
    head = build_head()
    feat = torch.randn(1, 24, 4, 6)
    samples = seg_samples(1, 29, 45, 5)
    loss = head.loss([feat], samples, train_cfg=dict())['loss_ce']
    logits = F.interpolate(head([feat]), size=(29, 45), mode='bilinear', align_corners=False)
    ref = F.cross_entropy(logits, samples[0].gt_sem_seg.data, ignore_index=255)
    assert torch.allclose(loss, ref, atol=1e-6)


# ------------------------------------------------------------------------ errors
@pytest.mark.parametrize('kwargs, name', [
    (dict(mode='xa'), 'mode'),
    (dict(num_layers=0), 'num_layers'),
    (dict(num_heads=-1), 'num_heads'),
    (dict(head_dims=0), 'head_dims'),
    (dict(mode='ca', ca_num_layers=0), 'ca_num_layers'),
    (dict(mode='ca', ca_num_heads=0), 'ca_num_heads'),
    (dict(mode='ca', ca_head_dims=0), 'ca_head_dims'),
    (dict(num_classes=0), 'num_classes'),
    (dict(channels=0), 'channels'),
    (dict(in_channels=0), 'in_channels'),
    (dict(out_channels=3, num_classes=2), 'out_channels'),
    (dict(out_channels=1, num_classes=2), 'use_sigmoid'),  # binary: sigmoid loss
    (dict(num_classes=1), 'use_sigmoid'),
    (dict(dropout_ratio=1.5), 'dropout_ratio'),
    (dict(in_channels=[8, 8], in_index=[0, 1], input_transform='multiple_select'),
     'input_transform'),
    (dict(in_channels=[8, 8], in_index=[0, 1]), 'in_channels'),
    (dict(in_channels=[8, 8], in_index=[0], input_transform='resize_concat'), 'in_index'),
])
def test_build_errors_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        build_head(**kwargs)


# -------------------------------------------------------------------- converters
def test_converter_rejects_unknown_keys_and_mixed_modes():
    fx = load_fixture(fixture_params('depict_sa')[0].values[0])
    sd = dict(fx['state_dict'])
    with pytest.raises(KeyError, match='mixes SA'):
        convert_depict(dict(sd, **{'cnet.layers.0.fn.proj': torch.zeros(1)}))
    sd['proj_dec.weight'] = torch.zeros(1)
    with pytest.raises(KeyError, match='proj_dec'):
        convert_depict(sd)


def test_convert_segmenter_rejects_stray_keys():
    with pytest.raises(KeyError, match='optimizer'):
        convert_segmenter({'decoder.cls_emb': torch.zeros(1, 2, 4),
                           'optimizer.x': torch.zeros(1)}, convert_depict)


@pytest.mark.parametrize('head', ['DEPICTHead', 'CBTHead'])
@pytest.mark.parametrize('in_channels', [16, 32])  # = channels (no projection), or not
def test_in_channels_that_do_not_match_the_backbone_name_both_widths(head, in_channels):
    """The tiny ViT outputs 24 channels; a head told otherwise says so by name (instead
    of torch's bare 'mat1 and mat2 shapes cannot be multiplied')."""
    extra = dict(mode='sa') if head == 'DEPICTHead' else dict(num_reps=4)
    model = tiny_vit_segmentor(dict(type=head, in_channels=in_channels, channels=16,
                                    num_classes=4, num_layers=1, num_heads=2, head_dims=8,
                                    **extra))
    with pytest.raises(ValueError, match=rf'{head}: in_channels={in_channels} but the '
                       r'selected feature map has 24 channels .*set in_channels=24'):
        model(torch.randn(1, 3, 32, 32), mode='tensor')
