"""Inputs that cannot work get a clear error naming the parameter or the input size;
inputs that can work, work.

- grids (``num_reps``, ``num_landmarks``): positive integers only, nothing truncated;
- token width checked against ``embed_dims`` at the start of every attention's and
  ISTA's forward (a shape check that traces under ``torch.compile``);
- WhiteBoxViT: images smaller than one patch, and a single one-patch image with the conv
  stem's BatchNorm in training mode, are refused with the minimum size;
- CBSA / CBTHead: more representatives than patch tokens is warned about once per
  configuration, with the numbers;
- class-mask heads with one output channel: mmseg's binary mode (sigmoid loss), refused
  with the softmax loss; gradients reach the encoder and the loss falls.
"""
import math
import warnings

import pytest
import torch
import torch.nn as nn
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from seg_helpers import tiny_vit_segmentor

import mmcbsa  # noqa: F401  (registers the modules)
from mmcbsa.models.attentions import base as attn_base
from mmcbsa.ops import once
from mmcbsa.models.backbones import WhiteBoxViT
from mmcbsa.models.layers import ISTA
from mmcbsa.registry import build_model

pytestmark = pytest.mark.usefixtures('one_thread')  # tiny tensors
SIGMOID_CE = dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0)
SOFTMAX_CE = dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)


@pytest.fixture
def fresh_warnings(monkeypatch):
    """An empty warn-once registry, and every warning recorded."""
    monkeypatch.setattr(once, '_WARNED', set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        yield caught


def _messages(caught, text):
    return [str(w.message) for w in caught if text in str(w.message)]


# ------------------------------------------------------------------------- grids
@pytest.mark.parametrize('bad', [(2.7, 3), (8.0, 8), 64.0, (True, 3), True, (2, 0), (4, ),
                                 (2, 3, 4), '64'])
@pytest.mark.parametrize('owner, name', [('CBSA', 'num_reps'), ('MiTA', 'num_landmarks'),
                                         ('CBTHead', 'num_reps')])
def test_non_integer_grids_are_refused(owner, name, bad):
    """Floats (even integral ones), bools and malformed pairs are refused, naming the
    parameter; nothing is truncated to ``(2, 3)`` silently."""
    if owner == 'CBTHead':
        cfg = dict(type='CBTHead', in_channels=16, channels=16, num_classes=3, num_heads=2,
                   head_dims=8, num_reps=bad, loss_decode=SOFTMAX_CE)
        build = MODELS.build
    else:
        cfg = dict(type=owner, embed_dims=16, num_heads=2, **{name: bad})
        build = build_model
    with pytest.raises(ValueError, match=name):
        build(cfg)


def test_integer_grids_still_work():
    assert attn_base.to_grid(64, 'num_reps', 'X') == (8, 8)
    assert attn_base.to_grid((2, 3), 'num_reps', 'X') == (2, 3)
    assert attn_base.to_grid([3, 5], 'num_reps', 'X') == (3, 5)
    assert build_model(dict(type='CBSA', embed_dims=16, num_heads=2,
                            num_reps=(2, 3))).num_reps == 6


# ------------------------------------------------------------------- input width
WIDTH_CASES = {
    'CBSA': dict(type='CBSA', embed_dims=16, num_heads=2, num_reps=4),
    'MSSA': dict(type='MSSA', embed_dims=16, num_heads=2),
    'TSSA': dict(type='TSSA', embed_dims=16, num_heads=2),
    'MHSA': dict(type='MHSA', embed_dims=16, num_heads=2),
    'PrimalAttention': dict(type='PrimalAttention', embed_dims=16, num_heads=2, low_rank=3,
                            num_tokens_train=10),
    'ISTA': dict(type='ISTA', embed_dims=16),
}


def _call(module, x):
    return module(x) if isinstance(module, ISTA) else module(x, hw_shape=(3, 3))


@pytest.mark.parametrize('name', sorted(WIDTH_CASES))
def test_input_width_is_checked_against_embed_dims(name):
    module = build_model(WIDTH_CASES[name])
    assert _call(module, torch.randn(2, 10, 16)).shape == (2, 10, 16)  # CLS + 3x3 patches
    with pytest.raises(ValueError, match=rf'{name}: .*embed_dims=16.*\(2, 10, 12\)'):
        _call(module, torch.randn(2, 10, 12))


@pytest.mark.parametrize('name', sorted(set(WIDTH_CASES) - {'ISTA'}))
def test_attention_needs_token_layout(name):
    """An attention takes ``(B, N, C)``; a ``(N, C)`` matrix is refused by name."""
    with pytest.raises(ValueError, match=rf'{name}: .*\(B, N, embed_dims=16\).*\(10, 16\)'):
        _call(build_model(WIDTH_CASES[name]), torch.randn(10, 16))


def test_ista_takes_any_leading_dims_and_mssa_checks_its_context():
    ista = build_model(WIDTH_CASES['ISTA'])
    assert ista(torch.randn(2, 3, 4, 16)).shape == (2, 3, 4, 16)
    mssa = build_model(WIDTH_CASES['MSSA'])
    assert mssa(torch.randn(2, 4, 16), context=torch.randn(2, 7, 16)).shape == (2, 4, 16)
    with pytest.raises(ValueError, match=r'MSSA \(context\).*embed_dims=16.*\(2, 7, 8\)'):
        mssa(torch.randn(2, 4, 16), context=torch.randn(2, 7, 8))


def test_width_check_compiles_without_graph_break():
    """The check is a shape comparison: dynamo traces the whole forward in one graph
    (``fullgraph=True`` fails on any graph break) and the result is unchanged."""
    torch.manual_seed(0)
    module = build_model(WIDTH_CASES['MSSA'])
    x = torch.randn(2, 10, 16)
    compiled = torch.compile(module, backend='eager', fullgraph=True)
    torch.testing.assert_close(compiled(x), module(x), rtol=0, atol=0)


# ------------------------------------------------------- WhiteBoxViT minimum size
def _vit(arch: str, patch_size: int) -> WhiteBoxViT:
    layer_cfgs = dict(attn_cfg=dict(num_reps=1)) if arch.startswith('cbt') else None
    return WhiteBoxViT(arch=dict(base=arch, embed_dims=32, num_layers=1, num_heads=2),
                       img_size=4 * patch_size, patch_size=patch_size, out_type='featmap',
                       layer_cfgs=layer_cfgs)


@pytest.mark.parametrize('arch, patch, h, w', [
    ('cbt-tiny', 16, 8, 40), ('cbt-tiny', 16, 40, 15), ('cbt-tiny', 8, 7, 7),
    ('deit-tiny', 16, 15, 64), ('deit-tiny', 16, 64, 4)])
def test_image_smaller_than_one_patch_is_refused(arch, patch, h, w):
    """Conv stem and patch stem, train and eval: one side below the patch size."""
    model = _vit(arch, patch)
    for mode in (model.train, model.eval):
        mode()
        with pytest.raises(ValueError, match=rf'input of {h}x{w} pixels.*minimum input size '
                                             rf'is {patch}x{patch}'):
            model(torch.randn(2, 3, h, w))


def test_conv_stem_batchnorm_minimum_in_training():
    """The conv stem's last BatchNorm sees ``B·⌈H/P⌉·⌈W/P⌉`` values per channel: one
    image of one patch cannot be normalised with batch statistics (torch's own error is
    'Expected more than 1 value per channel'); the bound in the message is exact."""
    model = _vit('cbt-tiny', 16).train()
    with pytest.raises(ValueError, match=r'batch of 1 image of 16x16 pixels.*at least 2 or an '
                                         r'input of at least 16x32'):
        model(torch.randn(1, 3, 16, 16))
    # just above the bound, everything trains: two images of one patch, one image of
    # two patches (also a padded 16x17 input), and one patch in eval mode
    for shape in [(2, 3, 16, 16), (1, 3, 16, 32), (1, 3, 16, 17), (1, 3, 32, 16)]:
        out = model(torch.randn(*shape))[0]
        out.square().mean().backward()
        assert torch.isfinite(out).all()
    model.eval()
    assert model(torch.randn(1, 3, 16, 16))[0].shape == (1, 32, 1, 1)
    # the patch stem has no BatchNorm: one image of one patch trains
    patch_model = _vit('deit-tiny', 16).train()
    assert patch_model(torch.randn(1, 3, 16, 16))[0].shape == (1, 32, 1, 1)


def test_batchnorm_bound_is_torchs_own():
    """What the message replaces: BatchNorm with batch statistics fails on one value."""
    bn = nn.BatchNorm2d(4).train()
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        bn(torch.randn(1, 4, 1, 1))
    bn(torch.randn(1, 4, 1, 2))


# ------------------------------------------------ more representatives than tokens
def test_cbsa_warns_once_per_configuration(fresh_warnings):
    cbsa = build_model(dict(type='CBSA', embed_dims=16, num_heads=2, num_reps=(4, 4)))
    x = torch.randn(2, 7, 16)  # CLS + 2x3 patches
    for _ in range(3):
        cbsa(x, hw_shape=(2, 3))
    msgs = _messages(fresh_warnings, 'representatives')
    assert len(msgs) == 1, msgs
    assert '16 representatives' in msgs[0] and '6 patch tokens (2x3 grid)' in msgs[0]
    assert 'num_reps <= 6' in msgs[0]
    cbsa(torch.randn(1, 5, 16), hw_shape=(2, 2))  # another grid: warned once more
    cbsa(torch.randn(1, 17, 16), hw_shape=(4, 4))  # m == h*w: linear cost, no warning
    cbsa(torch.randn(1, 31, 16), hw_shape=(5, 6))
    msgs = _messages(fresh_warnings, 'representatives')
    assert len(msgs) == 2 and '4 patch tokens (2x2 grid)' in msgs[1], msgs
    learned = build_model(dict(type='CBSA', embed_dims=16, num_heads=2, num_reps=9,
                               rep_mode='learned'))
    learned(torch.randn(1, 5, 16), hw_shape=(2, 2))
    assert '9 representatives' in _messages(fresh_warnings, 'representatives')[-1]


def test_cbt_head_warns_with_its_numbers(fresh_warnings):
    head = MODELS.build(dict(type='CBTHead', in_channels=16, channels=16, num_classes=3,
                             num_heads=2, head_dims=8, num_reps=100, loss_decode=SOFTMAX_CE))
    masks = head([torch.randn(1, 16, 5, 6)])
    assert masks.shape == (1, 3, 5, 6) and torch.isfinite(masks).all()
    msgs = _messages(fresh_warnings, 'representatives')
    assert len(msgs) == 1 and '100 representatives' in msgs[0] and '30 patch tokens' in msgs[0]


# ----------------------------------------------------------------- binary heads
HEADS = {
    'DEPICT-SA': dict(type='DEPICTHead', mode='sa'),
    'DEPICT-CA': dict(type='DEPICTHead', mode='ca', ca_head_dims=4),
    'CBT': dict(type='CBTHead', num_reps=4),
}


def _head_cfg(name, **kwargs):
    cfg = dict(HEADS[name], in_channels=24, channels=24, num_layers=1, num_heads=2,
               head_dims=8)
    cfg.update(kwargs)
    return cfg


def test_class_axis_layer_norm_of_one_class_is_constant():
    """Why num_classes=1 needs its own read-out: LayerNorm over one value returns its bias
    whatever the input, so nothing upstream gets a gradient."""
    norm = nn.LayerNorm(1)
    with torch.no_grad():
        norm.bias.fill_(0.3)
    x = torch.randn(5, 1, requires_grad=True)
    y = norm(x)
    torch.testing.assert_close(y, torch.full((5, 1), 0.3))
    y.sum().backward()
    assert x.grad.abs().max() == 0


@pytest.mark.parametrize('name', sorted(HEADS))
@pytest.mark.parametrize('classes', [dict(num_classes=1), dict(num_classes=2, out_channels=1)])
def test_binary_head_refuses_the_softmax_loss(name, classes):
    for loss in (SOFTMAX_CE, [SIGMOID_CE, SOFTMAX_CE]):
        with pytest.raises(ValueError, match=r"out_channels=1.*use_sigmoid=True"):
            MODELS.build(_head_cfg(name, loss_decode=loss, **classes))
    with pytest.raises(ValueError, match='use_sigmoid=True'):  # mmseg's default loss
        MODELS.build(_head_cfg(name, **classes))


@pytest.mark.parametrize('name', sorted(HEADS))
def test_out_channels_must_fit_num_classes(name):
    with pytest.raises(ValueError, match='out_channels'):
        MODELS.build(_head_cfg(name, num_classes=3, out_channels=2, loss_decode=SOFTMAX_CE))
    with pytest.raises(ValueError, match='num_classes must be 1 or 2, got 3'):
        MODELS.build(_head_cfg(name, num_classes=3, out_channels=1, loss_decode=SIGMOID_CE))


@pytest.mark.parametrize('name', sorted(HEADS))
def test_binary_read_out_matches_hand_formula(name):
    """``logit[b, 0, i, j] = s · cos(patch_bij, c_b) + b0`` written out per pixel."""
    head = MODELS.build(_head_cfg(name, num_classes=1, loss_decode=SIGMOID_CE, threshold=0.5))
    assert head.out_channels == 1 and head.cls_emb.shape == (1, 1, 24)
    assert not hasattr(head, 'mask_norm')
    with torch.no_grad():
        head.mask_scale.fill_(2.5)
        head.mask_bias.fill_(-0.4)
    patches, c = torch.randn(2, 6, 24), torch.randn(2, 1, 24)
    out = head.masks(patches, c, (2, 3))
    assert out.shape == (2, 1, 2, 3)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                p, q = patches[b, i * 3 + j], c[b, 0]
                cos = (p * q).sum() / (p.norm() * q.norm())
                torch.testing.assert_close(out[b, 0, i, j], 2.5 * cos - 0.4)
    params = (patches.double().requires_grad_(), c.double().requires_grad_())
    head = head.double()
    assert torch.autograd.gradcheck(lambda p, q: head.masks(p, q, (2, 3)), params)


def _binary_batch(gen, n=4, h=32, w=32):
    """Noise images with a bright 16x16 square: the square is the foreground (1)."""
    imgs = torch.randn(n, 3, h, w, generator=gen) * 0.3
    samples = []
    for k in range(n):
        y0, x0 = torch.randint(0, h - 16, (2, ), generator=gen).tolist()
        label = torch.zeros(1, h, w, dtype=torch.long)
        label[:, y0:y0 + 16, x0:x0 + 16] = 1
        imgs[k, :, y0:y0 + 16, x0:x0 + 16] += 1.5
        s = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        s.gt_sem_seg = PixelData(data=label)
        samples.append(s)
    return imgs, samples


@pytest.mark.parametrize('name, classes', [
    ('CBT', dict(num_classes=1)), ('DEPICT-SA', dict(num_classes=1)),
    ('DEPICT-CA', dict(num_classes=2, out_channels=1))])
def test_binary_head_trains(name, classes):
    """num_classes=1 (or 2 with out_channels=1) + sigmoid BCE: gradients reach every
    encoder parameter, the loss falls below the label prior's entropy within 40 AdamW
    steps, and predict thresholds sigmoid(logit) into {0, 1}."""
    torch.manual_seed(0)
    model = tiny_vit_segmentor(_head_cfg(name, loss_decode=SIGMOID_CE, threshold=0.5,
                                         **classes))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    data = [_binary_batch(gen) for _ in range(4)]
    losses = []
    for step in range(40):
        model.train()
        loss = model.loss(*data[step % 4])['decode.loss_ce']
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for pname, p in model.backbone.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, pname
            assert model.decode_head.mask_scale.grad.abs() > 0
        opt.step()
        losses.append(loss.item())
    prior = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 16x16 of 32x32 foreground
    late = sum(losses[-8:]) / 8
    assert late < 0.8 * prior < losses[0], (losses[0], late, prior)
    model.eval()
    with torch.no_grad():
        result = model.predict(*_binary_batch(gen, n=1))[0]
    assert result.seg_logits.data.shape == (1, 32, 32)
    pred = result.pred_sem_seg.data
    assert pred.shape == (1, 32, 32) and set(pred.unique().tolist()) <= {0, 1}
    probs = result.seg_logits.data  # mmseg stores sigmoid(logit) in binary mode
    assert 0 <= probs.min() and probs.max() <= 1
    torch.testing.assert_close(pred, (probs > 0.5).to(pred))


def test_two_class_softmax_head_warns(fresh_warnings):
    MODELS.build(_head_cfg('DEPICT-SA', num_classes=2, loss_decode=SOFTMAX_CE))
    MODELS.build(_head_cfg('DEPICT-SA', num_classes=2, loss_decode=SOFTMAX_CE))
    msgs = _messages(fresh_warnings, 'num_classes=2 with the class-axis LayerNorm')
    assert len(msgs) == 1 and 'out_channels=1' in msgs[0]
