"""CBT decode head (docs/mechanisms.md §4): official parity, an in-test reference
(docs/mechanisms.md §1 CBSA written out by loops), gradients, mmseg integration (loss /
whole + slide predict at awkward sizes), multi-level inputs, attention swaps, converters
and build errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import fixture_params, load_fixture
from reference_configs import cbt_head
from mmseg.registry import MODELS
from seg_helpers import (REPO, assert_all_grads, check_head_matches_fixture,
                         check_resize_concat_head, check_segmentor_loss_and_grads,
                         check_segmentor_predict, layer_norm_ref, randomise_layer_norms,
                         seg_samples, tiny_vit_segmentor, train_on_mini_data)

import mmcbsa  # noqa: F401  (registers CBTHead)
from mmcbsa.converters import (KINDS, ConvertOptions, convert_cbt_decoder,
                               convert_segmenter)
from mmcbsa.models.decode_heads import ClassMaskHead, PreNormAttnLayer
from mmcbsa.models.decode_heads.class_mask_head import resize_separable

TOL = 1e-4


def build_head(**kwargs):
    cfg = dict(type='CBTHead', in_channels=24, channels=24, num_classes=5, num_layers=2,
               num_heads=2, head_dims=8, num_reps=4, loss_decode=dict(
                   type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0))
    cfg.update(kwargs)
    return MODELS.build(cfg)


# --------------------------------------------------------------------------- parity
@pytest.mark.parametrize('path', fixture_params('cbt_decoder'))
def test_official_parity(path):
    fx = load_fixture(path)
    cfg = fx['config']
    head = MODELS.build(cbt_head(cfg))
    head.load_state_dict(convert_cbt_decoder(fx['state_dict']), strict=True)
    head.eval()
    assert head.layers[0].attn.num_reps == cfg['num_reps']
    assert not head.layers[0].attn.legacy_pooling  # reps pooled from the patch grid
    check_head_matches_fixture(head, fx, TOL)  # (B, hw, d) row-major patch tokens


@pytest.mark.parametrize('path', fixture_params('cbt_decoder'))
def test_sizes_read_off_the_tensors_match_the_fixture_config(path):
    fx = load_fixture(path)
    opts = ConvertOptions(num_reps=fx['config']['num_reps'])
    sizes = KINDS['cbt-decoder'].infer(fx['state_dict'], opts, {}).sizes['decode_head']
    assert dict(sizes, type='CBTHead') == cbt_head(fx['config'])


# ------------------------------------------------------------ in-test reference
def _avg_pool(img, out_h, out_w):
    """Adaptive average pooling of ``(C, h, w)`` by explicit windows."""
    c, h, w = img.shape
    out = img.new_zeros(c, out_h, out_w)
    for i in range(out_h):
        r0, r1 = (i * h) // out_h, -((-(i + 1) * h) // out_h)
        for j in range(out_w):
            c0, c1 = (j * w) // out_w, -((-(j + 1) * w) // out_w)
            out[:, i, j] = img[:, r0:r1, c0:c1].mean((1, 2))
    return out


def _cbsa(x, attn, hw, n_patch_first):
    """docs/mechanisms.md §1 on one image ``x (N, d)`` whose first ``n_patch_first`` tokens are the
    ``h×w`` patches (the reference's order: patches, then classes)."""
    h, w = hw
    heads, p = attn.num_heads, attn.head_dims
    s_h, s_w = attn.rep_grid
    wt = x @ attn.in_proj.weight.t()  # (N, Hp)
    grid = wt[:n_patch_first].t().reshape(heads * p, h, w)
    r0 = _avg_pool(grid, s_h, s_w).reshape(heads * p, -1).t()  # (m, Hp), all channels
    outs = []
    for i in range(heads):
        sl = slice(i * p, (i + 1) * p)
        wh, rh = wt[:, sl], r0[:, sl]
        a = torch.softmax(rh @ wh.t() / math.sqrt(p), dim=-1)  # (m, N) over tokens
        r = rh + attn.step_rep[i] * (a @ wh)
        delta = torch.softmax(r @ r.t() / math.sqrt(p), dim=-1) @ r
        outs.append(attn.step_x[i] * (a.t() @ delta))  # (N, p)
    return torch.cat(outs, -1) @ attn.out_proj.weight.t() + attn.out_proj.bias


def reference_cbt(head, feat):
    """docs/mechanisms.md §4 on the head's parameters, patches first like the official code."""
    b, c_in, h, w = feat.shape
    x = feat.flatten(2).transpose(1, 2)
    if c_in != head.channels:
        x = x @ head.input_proj.weight.t() + head.input_proj.bias
    n_cls = head.cls_emb.shape[1]
    masks = []
    for i in range(b):
        t = torch.cat([x[i], head.cls_emb[0]], 0)
        for layer in head.layers:
            t = t + _cbsa(layer_norm_ref(t, layer.norm), layer.attn, (h, w), h * w)
        t = layer_norm_ref(t, head.decoder_norm)
        patches, cls = t[:-n_cls], t[-n_cls:]
        patches = patches / patches.norm(dim=-1, keepdim=True)
        cls = cls / cls.norm(dim=-1, keepdim=True)
        m = layer_norm_ref(patches @ cls.t(), head.mask_norm)  # (hw, n_cls)
        masks.append(m.t().reshape(n_cls, h, w))
    return torch.stack(masks)


@pytest.mark.parametrize('in_channels, num_reps, hw', [
    (24, 4, (3, 7)),          # square 2x2 reps from a non-square grid
    (40, (2, 3), (5, 4)),     # input projection, rectangular rep grid
    (24, 9, (2, 2)),          # more representatives than patches (windows repeat)
])
def test_matches_in_test_reference(in_channels, num_reps, hw):
    torch.manual_seed(0)
    head = build_head(in_channels=in_channels, num_reps=num_reps, num_heads=3,
                      head_dims=6).eval()
    randomise_layer_norms(head)
    head.double()
    feat = torch.randn(2, in_channels, *hw, dtype=torch.float64)
    with torch.no_grad():
        out = head([feat])
        ref = reference_cbt(head, feat)
    assert out.shape == (2, 5, *hw)
    assert (out - ref).abs().max().item() <= 1e-10
    assert isinstance(head.input_proj, torch.nn.Identity) == (in_channels == 24)


def test_paper_defaults_and_composition():
    head = MODELS.build(dict(type='CBTHead', in_channels=192, channels=192, num_classes=150))
    assert isinstance(head, ClassMaskHead)
    assert len(head.layers) == 3
    attn = head.layers[0].attn
    assert type(attn).__name__ == 'CBSA'  # the attention family's module, not a copy
    assert isinstance(head.layers[0], PreNormAttnLayer)
    assert attn.num_heads == 3 and attn.head_dims == 100 and attn.rep_grid == (10, 10)
    assert attn.in_proj.weight.shape == (300, 192)
    assert head.cls_emb.shape == (1, 150, 192)
    assert not hasattr(head, 'conv_seg') and not hasattr(head, 'dropout')


def test_attention_overrides():
    learned = build_head(attn_cfg=dict(rep_mode='learned'))
    assert learned.layers[0].attn.reps.shape == (4, 16)
    out = learned([torch.randn(1, 24, 3, 5)])
    assert out.shape == (1, 5, 3, 5)
    mssa = build_head(attn_cfg=dict(type='MSSA', head_dims=4))  # swap with one key
    assert type(mssa.layers[0].attn).__name__ == 'MSSA'
    assert mssa([torch.randn(1, 24, 3, 5)]).shape == (1, 5, 3, 5)


# --------------------------------------------------------- gradients / multi-level
def test_gradcheck_float64():
    torch.manual_seed(0)
    head = build_head(in_channels=6, channels=8, num_classes=3, num_layers=2, num_heads=2,
                      head_dims=3, num_reps=(2, 2)).double()
    randomise_layer_norms(head)
    feat = torch.randn(1, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: head([f]), (feat, ), eps=1e-6, atol=1e-6)
    head([feat]).square().mean().backward()
    assert_all_grads(head)


def test_multi_level_resize_concat():
    torch.manual_seed(0)
    check_resize_concat_head(build_head)


# ----------------------------------------------------------------- mmseg segmentor
def _segmentor(test_cfg=None, num_classes=4):
    """Tiny mmseg ViT (width 24) + CBT head (16 channels, 3x3 representatives)."""
    return tiny_vit_segmentor(
        dict(type='CBTHead', in_channels=24, channels=16, num_classes=num_classes,
             num_layers=2, num_heads=2, head_dims=8, num_reps=9,
             loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
        test_cfg)


def test_segmentor_loss_and_gradients_non_divisible():
    torch.manual_seed(0)
    # 43x61: not multiples of the patch size, non-square
    check_segmentor_loss_and_grads(_segmentor(), (43, 61), num_classes=4)


@pytest.mark.parametrize('test_cfg', [dict(mode='whole'),
                                      dict(mode='slide', crop_size=(32, 32), stride=(24, 24))])
def test_segmentor_predict(test_cfg):
    torch.manual_seed(0)
    check_segmentor_predict(_segmentor(test_cfg), (45, 70), num_classes=4)


# ------------------------------------------------------------------------ errors
@pytest.mark.parametrize('kwargs, name', [
    (dict(num_layers=0), 'num_layers'),
    (dict(num_heads=-1), 'num_heads'),
    (dict(head_dims=0), 'head_dims'),
    (dict(num_reps=10), 'num_reps'),
    (dict(num_reps=(2, 0)), 'num_reps'),
    (dict(num_classes=0), 'num_classes'),
    (dict(channels=0), 'channels'),
    (dict(in_channels=0), 'in_channels'),
    (dict(out_channels=3, num_classes=2), 'out_channels'),
    (dict(out_channels=1, num_classes=2), 'use_sigmoid'),  # binary: sigmoid loss
    (dict(num_classes=1), 'use_sigmoid'),
    (dict(dropout_ratio=1.0), 'dropout_ratio'),
    (dict(attn_cfg=dict(embed_dims=8)), 'embed_dims'),
    # a swapped attention gets no head_dims: MSSA needs channels % num_heads == 0
    (dict(num_heads=5, attn_cfg=dict(type='MSSA')), 'embed_dims'),
    (dict(in_channels=[8, 8], in_index=[0, 1], input_transform='multiple_select'),
     'input_transform'),
    (dict(in_channels=[8, 8], in_index=[0, 1]), 'in_channels'),
    (dict(in_channels=[8, 8], in_index=[0], input_transform='resize_concat'), 'in_index'),
])
def test_build_errors_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        build_head(**kwargs)


# -------------------------------------------------------------------- converters
def test_converter_rejects_unknown_and_missing_keys():
    fx = load_fixture(fixture_params('cbt_decoder')[0].values[0])
    sd = dict(fx['state_dict'])
    bad = dict(sd, **{'net.layers.0.fn.qkv.weight': torch.zeros(1)})
    with pytest.raises(KeyError, match='qkv'):
        convert_cbt_decoder(bad)
    missing = {k: v for k, v in sd.items() if k != 'net.layers.1.fn.step_x'}
    with pytest.raises(KeyError, match='step_x'):
        convert_cbt_decoder(missing)
    with pytest.raises(KeyError, match='proj_dec'):
        convert_cbt_decoder(dict(sd, **{'proj_dec.weight': torch.zeros(1)}))


def test_convert_segmenter_prefixes():
    fx = load_fixture(fixture_params('cbt_decoder')[0].values[0])
    wrapped = {'decoder.' + k: v for k, v in fx['state_dict'].items()}
    out = convert_segmenter(wrapped, convert_cbt_decoder)
    bare = convert_cbt_decoder(fx['state_dict'])
    assert set(out) == {'decode_head.' + k for k in bare}
    for k, v in bare.items():
        assert torch.equal(out['decode_head.' + k], v)
    assert out['decode_head.layers.0.attn.step_x'].shape == (fx['config']['n_heads'], )
    with pytest.raises(KeyError, match='optimizer'):
        convert_segmenter(dict(wrapped, **{'optimizer.x': torch.zeros(1)}), convert_cbt_decoder)


# ------------------------------------------------- MiTA segmenter: a real training run
def test_mita_segmenter_trains_with_train_tool(tmp_path):
    """A few iterations of the MiTA + CBT-head segmenter on the synthetic mini ADE20K
    through tools/train.py (mmengine Runner, mmseg dataset/pipeline/IoUMetric)."""
    import re
    iters = 3
    config = REPO / 'configs/cbt/mita-nano_cbt-head_1xb8-mini-ade20k-128x128.py'
    records, log, work = train_on_mini_data(config, 'ade20k', tmp_path, iters, size=(96, 128))
    miou = [r['mIoU'] for r in records if 'mIoU' in r]
    assert miou and 0.0 <= miou[-1] <= 100.0
    ckpt = torch.load(work / f'iter_{iters}.pth', map_location='cpu', weights_only=True)
    sd = ckpt['state_dict']
    assert 'backbone.layers.0.attn.qkv.weight' in sd  # MiTA's projection
    assert sd['decode_head.layers.0.attn.step_x'].shape == (3, )  # CBSA in the head
    assert re.search(rf'Iter\(train\) \[{iters}/{iters}\]', log)


# ------------------------------------------------------- the loss's separable resize
@pytest.mark.parametrize('align_corners', [False, True])
@pytest.mark.parametrize('src, dst', [((4, 4), (32, 32)), ((5, 7), (43, 61)),
                                      ((9, 6), (4, 5)), ((3, 3), (3, 3))])
def test_resize_separable_is_bilinear_interpolation(src, dst, align_corners):
    """The loss's resize equals ``F.interpolate(mode='bilinear')`` (up, down, non-square,
    same size), values and gradient, and stays float32 under bfloat16 autocast."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, *src, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, *dst, dtype=torch.float64)
    ref = F.interpolate(x, dst, mode='bilinear', align_corners=align_corners)
    (ref_grad, ) = torch.autograd.grad(ref, x, g)
    out = resize_separable(x, dst, align_corners)
    (out_grad, ) = torch.autograd.grad(out, x, g)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(out_grad, ref_grad, rtol=0, atol=1e-12)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        low = resize_separable(x.detach().float(), dst, align_corners)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref.detach().float(), rtol=0, atol=1e-5)


def test_resize_separable_hand_example():
    """2 -> 4 pixels, align_corners=False: sources at -0.25, 0.25, 0.75, 1.25 (clamped)."""
    x = torch.tensor([[[[0., 4.]]]])
    out = resize_separable(x, (1, 4), False)
    torch.testing.assert_close(out, torch.tensor([[[[0., 1., 3., 4.]]]]))


def test_loss_equals_mmseg_resize_loss():
    """The head's loss (separable resize first) equals mmseg's ``BaseDecodeHead`` loss
    (its own bilinear resize) on the same logits: values and the logits' gradient."""
    from mmseg.models.decode_heads.decode_head import BaseDecodeHead
    torch.manual_seed(0)
    head = build_head()
    samples = seg_samples(2, 43, 61, 5)
    logits = torch.randn(2, 5, 6, 8, requires_grad=True)
    ours = head.loss_by_feat(logits, samples)
    (ours_grad, ) = torch.autograd.grad(ours['loss_ce'], logits)
    ref = BaseDecodeHead.loss_by_feat(head, logits, samples)
    (ref_grad, ) = torch.autograd.grad(ref['loss_ce'], logits)
    assert set(ours) == set(ref) == {'loss_ce', 'acc_seg'}
    torch.testing.assert_close(ours['loss_ce'], ref['loss_ce'], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours['acc_seg'], ref['acc_seg'])
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-5, atol=1e-9)
