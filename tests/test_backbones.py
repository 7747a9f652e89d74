"""WhiteBoxViT: reference parity (vit_* fixtures), an in-test reference forward, every
arch forward/backward at reduced size and other resolutions, feature maps for mmseg,
per-layer attention overrides and build-time errors."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import fixture_params, load_fixture
from reference_configs import white_box_classifier
from mmengine.registry import DefaultScope

import mmcbsa  # noqa: F401
from mmcbsa.converters import convert_white_box_vit
from mmcbsa.models.attentions.primal import PrimalAttention, collect_ksvd_loss
from mmcbsa.models.backbones import ConvStem, WhiteBoxViT


def _pretrain_build(cfg):
    from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(cfg)


# ---------------------------------------------------------------------------------
# parity with the reference classifiers (docs/mechanisms.md §7)
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize('path', fixture_params('vit_'))
def test_reference_classifier_parity(path):
    fx = load_fixture(path)
    model = _pretrain_build(white_box_classifier(fx['config']))
    state = convert_white_box_vit(fx['state_dict'], fx['config']['attn'])
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(fx['input'], mode='tensor')
    assert logits.shape == fx['output'].shape
    err = (logits - fx['output']).abs().max().item()
    assert err <= 1e-4, f'{path.stem}: max abs err {err:.3e}'


def test_converter_rejects_incomplete_state_dict():
    path = fixture_params('vit_cbsa')[0].values[0]
    fx = load_fixture(path)
    sd = dict(fx['state_dict'])
    sd.pop('mlp_head.1.bias')
    with pytest.raises(KeyError, match='mlp_head.1.bias'):
        convert_white_box_vit(sd, fx['config']['attn'])
    sd = dict(fx['state_dict'], extra_param=torch.zeros(1))
    with pytest.raises(KeyError, match='extra_param'):
        convert_white_box_vit(sd, fx['config']['attn'])


# ---------------------------------------------------------------------------------
# an independent forward written from docs/mechanisms.md §1 with torch primitives
# ---------------------------------------------------------------------------------
def _reference_forward(model: WhiteBoxViT, img: torch.Tensor) -> torch.Tensor:
    """Conv stem (conv → BN → GELU, no GELU after the last), [CLS; patches] + bicubic
    resized pos_embed, blocks ``z = x + attn(LN1 x); x = ISTA(LN2 z)``, final LN."""
    x = img
    convs = list(model.patch_embed.convs)
    for i, cm in enumerate(convs):
        x = F.conv2d(x, cm.conv.weight, stride=2, padding=1)
        bn = cm.bn
        x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                         training=False, eps=bn.eps)
        if i < len(convs) - 1:
            x = F.gelu(x)
    b, c, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)
    gh, gw = model.patch_resolution
    grid = model.pos_embed[:, 1:].reshape(1, gh, gw, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode='bicubic', align_corners=False)
    pos = torch.cat([model.pos_embed[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
    x = torch.cat([model.cls_token.expand(b, -1, -1), tokens], dim=1) + pos
    for layer in model.layers:
        ln1, ln2 = layer.norm1, layer.norm2
        z = x + layer.attn(F.layer_norm(x, (c, ), ln1.weight, ln1.bias, ln1.eps),
                           hw_shape=(h, w))
        u = F.layer_norm(z, (c, ), ln2.weight, ln2.bias, ln2.eps)
        d = layer.ffn.weight  # ISTA: ReLU(u + η(u D − u Dᵀ D) − η λ), η = λ = 0.1
        x = F.relu(u + 0.1 * (u @ d - (u @ d.t()) @ d) - 0.1 * 0.1)
    return F.layer_norm(x, (c, ), model.norm.weight, model.norm.bias, model.norm.eps)


@pytest.mark.parametrize('shape', [(64, 64), (96, 64), (80, 112)])
def test_cbt_matches_in_test_reference(shape):
    torch.manual_seed(0)
    model = WhiteBoxViT(dict(base='cbt-tiny', embed_dims=32, num_layers=2, num_heads=2,
                             attn_cfg=dict(head_dims=16, num_reps=4)),
                        img_size=64, patch_size=16, out_type='raw')
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
    torch.nn.init.normal_(model.pos_embed, std=0.5)
    torch.nn.init.normal_(model.cls_token, std=0.5)
    model.eval()
    img = torch.randn(2, 3, *shape)
    with torch.no_grad():
        out = model(img)[0]
        ref = _reference_forward(model, img)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_conv_stem_layout_follows_spec():
    # patch 16: 3 -> d/8 -> d/4 -> d/2 -> d; patch 8: 3 -> d/4 -> d/2 -> d; no bias, BN,
    # GELU between the convs only.
    for patch, chans in [(16, [3, 8, 16, 32, 64]), (8, [3, 16, 32, 64])]:
        stem = ConvStem(embed_dims=64, patch_size=patch)
        convs = list(stem.convs)
        assert [cm.conv.in_channels for cm in convs] + [convs[-1].conv.out_channels] == chans
        assert all(cm.conv.bias is None and cm.conv.stride == (2, 2) for cm in convs)
        assert all(isinstance(cm.bn, torch.nn.BatchNorm2d) for cm in convs)
        assert [cm.with_activation for cm in convs] == [True] * (len(convs) - 1) + [False]
        tokens, hw = stem(torch.randn(1, 3, 70, 33))  # padded to multiples of the patch
        assert hw == (-(-70 // patch), -(-33 // patch))
        assert tokens.shape == (1, hw[0] * hw[1], 64)


# ---------------------------------------------------------------------------------
# every arch at reduced size, other resolutions, forward + backward
# ---------------------------------------------------------------------------------
_SMALL_ATTN = {
    'CBSA': dict(head_dims=16, num_reps=(2, 3)),
    'MSSA': dict(head_dims=16),
    'TSSA': dict(head_dims=16),
    'MHSA': dict(),
    'MiTA': dict(num_landmarks=4, topk=4),
    'PrimalAttention': dict(low_rank=3, rank_multi=2),
}
_FAMILIES = ['cbt-tiny', 'cbt-small', 'cbt-base', 'cbt-large', 'crate-tiny', 'crate-large',
             'tost-tiny', 'tost-small', 'deit-tiny', 'mita-deit-tiny', 'mita-deit-small',
             'mita-deit-small-dwc-gate', 'primal-deit-small', 'primalformer-small']


def _reduced(arch: str) -> dict:
    """The zoo arch with width 32, 3 blocks, 2 heads and small attention settings."""
    full = WhiteBoxViT.arch_zoo[arch]
    cfg = dict(base=arch, embed_dims=32, num_layers=3, num_heads=2)
    cfg['attn_cfg'] = dict(_SMALL_ATTN[full['attn_cfg']['type']])
    if full.get('tail_attn_cfg'):
        tail = full['tail_attn_cfg']
        cfg['tail_attn_cfg'] = dict(tail, **_SMALL_ATTN[tail['type']])
    return cfg


def test_arch_zoo_covers_the_issue():
    for name in ['cbt-tiny', 'cbt-small', 'cbt-base', 'cbt-large', 'crate-tiny', 'crate-small',
                 'crate-base', 'crate-large', 'tost-tiny', 'tost-small', 'mita-deit-tiny',
                 'mita-deit-small', 'primal-deit-small', 'primalformer-small']:
        assert name in WhiteBoxViT.arch_zoo
    zoo = WhiteBoxViT.arch_zoo
    assert [zoo['cbt-' + s]['embed_dims'] for s in ('tiny', 'small', 'base', 'large')] == \
        [192, 384, 768, 1024]
    assert zoo['cbt-large']['num_layers'] == 24 and zoo['cbt-large']['num_heads'] == 16
    assert zoo['cbt-tiny']['attn_cfg'] == dict(type='CBSA', head_dims=64, num_reps=64)
    assert zoo['cbt-tiny']['norm_eps'] == 1e-5 and zoo['mita-deit-tiny']['norm_eps'] == 1e-6
    gated = zoo['mita-deit-small-dwc-gate']
    assert gated['attn_cfg'] == dict(type='MiTA', num_landmarks=25, topk=25, qkv_bias=True,
                                     dwc=True, gate=True)
    assert gated['embed_dims'] == 384 and zoo['mita-deit-s-dwc-gate'] == gated
    assert zoo['primal-deit-small']['tail_attn_cfg']['low_rank'] == 96
    assert zoo['primalformer-small']['attn_cfg']['low_rank'] == 20


@pytest.mark.parametrize('arch', _FAMILIES)
def test_every_arch_forward_backward_other_resolutions(arch):
    torch.manual_seed(0)
    model = WhiteBoxViT(_reduced(arch), img_size=64, patch_size=16, out_type='cls_token',
                        drop_path_rate=0.1)
    model.train()
    for shape in [(48, 80), (96, 96)]:  # non-square and larger than the training size
        img = torch.randn(2, 3, *shape, requires_grad=True)
        (cls, ) = model(img)
        assert cls.shape == (2, 32) and torch.isfinite(cls).all()
        model.zero_grad()
        loss = cls.square().mean()
        if any(isinstance(m, PrimalAttention) for m in model.modules()):
            loss = loss + collect_ksvd_loss(model)  # Λ is used by the KSVD loss only
        loss.backward()
        assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
        for name, p in model.named_parameters():
            assert p.grad is not None, f'{arch}: no gradient for {name}'
            assert torch.isfinite(p.grad).all(), name


def test_full_size_cbt_tiny_forward_shape():
    model = WhiteBoxViT('cbt-tiny').eval()
    with torch.no_grad():
        (cls, ) = model(torch.randn(1, 3, 224, 224))
    assert cls.shape == (1, 192)


# ---------------------------------------------------------------------------------
# feature maps for mmseg
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize('arch', ['cbt-tiny', 'tost-tiny', 'mita-deit-tiny'])
def test_featmap_outputs_any_size(arch):
    model = WhiteBoxViT(_reduced(arch), img_size=64, patch_size=16, out_type='featmap',
                        out_indices=(0, 1, -1)).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 100, 130))  # not multiples of 16: padded
    assert [tuple(o.shape) for o in outs] == [(2, 32, 7, 9)] * 3
    raw = WhiteBoxViT(_reduced(arch), img_size=64, patch_size=16, out_type='raw').eval()
    raw.load_state_dict(model.state_dict())
    with torch.no_grad():
        img = torch.randn(1, 3, 64, 48)
        fmap = model(img)[-1]
        tokens = raw(img)[0]
    # the feature map is the normalised patch tokens, row-major on the (h, w) grid
    torch.testing.assert_close(fmap.flatten(2).transpose(1, 2), tokens[:, 1:])
    avg = WhiteBoxViT(_reduced(arch), img_size=64, patch_size=16, out_type='avg_featmap')
    avg.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(avg.eval()(img)[0], tokens[:, 1:].mean(1))


def test_mmseg_encoder_decoder_with_white_box_vit():
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmengine.config import ConfigDict
    from mmengine.structures import PixelData
    cfg = dict(
        type='EncoderDecoder',
        data_preprocessor=dict(type='SegDataPreProcessor', size_divisor=16),
        backbone=dict(type='WhiteBoxViT', arch=_reduced('cbt-tiny'), img_size=64,
                      patch_size=16, out_type='featmap', out_indices=(-1, )),
        decode_head=dict(type='FCNHead', in_channels=32, channels=16, num_convs=1,
                         num_classes=5, concat_input=False,
                         loss_decode=dict(type='CrossEntropyLoss')),
        test_cfg=dict(mode='whole'))
    with DefaultScope.overwrite_default_scope('mmseg'):
        seg = MODELS.build(ConfigDict(cfg))
    img = torch.randn(2, 3, 72, 100)
    samples = []
    for _ in range(2):
        s = SegDataSample(metainfo=dict(img_shape=(72, 100), ori_shape=(72, 100),
                                        pad_shape=(80, 112)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 5, (1, 72, 100)))
        samples.append(s)
    losses = seg.loss(torch.nn.functional.pad(img, (0, 12, 0, 8)), samples)
    assert torch.isfinite(losses['decode.loss_ce'])
    seg.eval()
    with torch.no_grad():
        pred = seg.predict(torch.nn.functional.pad(img, (0, 12, 0, 8)), samples)
    assert pred[0].pred_sem_seg.data.shape == (1, 72, 100)


# ---------------------------------------------------------------------------------
# per-layer attention, drop path, position embedding loading, errors
# ---------------------------------------------------------------------------------
def test_tail_layers_and_per_layer_attention():
    """The two places a block's attention is set: the arch (every block, and its last
    ``num_tail_layers`` blocks) and ``layer_cfgs`` (every block, or one dict per block)."""
    arch = dict(base='cbt-tiny', embed_dims=32, num_layers=4, num_heads=2,
                attn_cfg=dict(head_dims=16, num_reps=4))
    tail = dict(arch, num_tail_layers=2, tail_attn_cfg=dict(type='MSSA', head_dims=16))
    model = WhiteBoxViT(tail, img_size=64,
                        layer_cfgs=[dict(attn_cfg=dict(type='TSSA')), {}, {},
                                    dict(attn_cfg=dict(type='MHSA'))])
    kinds = [type(layer.attn).__name__ for layer in model.layers]
    assert kinds == ['TSSA', 'CBSA', 'MSSA', 'MHSA']
    # a same-type attn_cfg updates the arch's attention config instead of replacing it
    model = WhiteBoxViT(arch, img_size=64, layer_cfgs=dict(attn_cfg=dict(num_reps=(1, 2))))
    assert all(layer.attn.rep_grid == (1, 2) and layer.attn.head_dims == 16
               for layer in model.layers)
    # one key swaps the attention of every block, the tail's too
    model = WhiteBoxViT(tail, img_size=64, layer_cfgs=dict(attn_cfg=dict(type='MSSA')))
    assert {type(layer.attn).__name__ for layer in model.layers} == {'MSSA'}
    # mmpretrain-style per-layer block kwargs
    model = WhiteBoxViT(arch, img_size=64,
                        layer_cfgs=[dict(), dict(layout='residual'), dict(), dict()])
    assert [layer.layout for layer in model.layers] == ['ista', 'residual', 'ista', 'ista']
    # an FFN swapped in through layer_cfgs gets the arch's mlp_ratio width
    model = WhiteBoxViT(dict(arch, mlp_ratio=2), img_size=64,
                        layer_cfgs=dict(ffn_cfg=dict(type='FFN'), layout='residual'))
    assert model.layers[0].ffn.feedforward_channels == 64


@pytest.mark.parametrize('key, value, replacement', [
    ('attn_cfg', dict(type='MSSA'), 'layer_cfgs=dict(attn_cfg='),
    ('ffn_cfg', dict(type='ISTA'), 'layer_cfgs=dict(ffn_cfg='),
    ('tail_attn_cfg', dict(type='MSSA'), 'num_tail_layers=n, tail_attn_cfg'),
    ('num_tail_layers', 1, 'arch=dict(base=..., num_tail_layers'),
    ('attn_cfg_override', {0: dict(type='MSSA')}, 'layer_cfgs, a list'),
])
def test_removed_keys_name_their_replacement(key, value, replacement):
    with pytest.raises(ValueError, match=rf'{key} was removed; use .*{re.escape(replacement)}'):
        WhiteBoxViT('cbt-tiny', **{key: value})


def test_unknown_keys():
    with pytest.raises(TypeError, match='attn_cgf'):
        WhiteBoxViT('cbt-tiny', attn_cgf=dict(type='MSSA'))
    with pytest.raises(ValueError, match=r"unknown keys \['attn_cfg_override'\].*layer_cfgs"):
        WhiteBoxViT(dict(base='cbt-tiny', attn_cfg_override={0: dict(type='MSSA')}))


def test_drop_path_increases_linearly():
    model = WhiteBoxViT(dict(base='cbt-tiny', embed_dims=32, num_layers=5, num_heads=2,
                             attn_cfg=dict(head_dims=16, num_reps=4)),
                        img_size=64, drop_path_rate=0.4)
    rates = [getattr(layer.drop_path, 'drop_prob', 0.0) for layer in model.layers]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_pos_embed_resized_when_loading_other_resolution():
    arch = dict(base='cbt-tiny', embed_dims=32, num_layers=1, num_heads=2,
                attn_cfg=dict(head_dims=16, num_reps=4))
    small = WhiteBoxViT(arch, img_size=64)  # 4x4 grid
    torch.nn.init.normal_(small.pos_embed)
    big = WhiteBoxViT(arch, img_size=96)  # 6x6 grid
    big.load_state_dict(small.state_dict())
    grid = small.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(6, 6), mode='bicubic', align_corners=False)
    torch.testing.assert_close(big.pos_embed[:, 1:],
                               ref.flatten(2).transpose(1, 2).detach())
    torch.testing.assert_close(big.pos_embed[:, :1], small.pos_embed[:, :1].detach())


@pytest.mark.parametrize('kwargs, match', [
    (dict(arch='cbt-huge'), 'unknown arch'),
    (dict(arch=dict(embed_dims=64, num_layers=0, num_heads=2)), 'num_layers'),
    (dict(out_type='tokens'), 'out_type'),
    (dict(out_type='cls_token', with_cls_token=False), 'with_cls_token'),
    (dict(out_indices=(12, )), 'out_indices'),
    (dict(patch_size=12), 'patch_size'),
    (dict(arch=dict(base='cbt-tiny', num_tail_layers=13)), 'num_tail_layers'),
    (dict(arch=dict(base='cbt-tiny', num_tail_layers=1)), 'tail_attn_cfg'),
    (dict(layer_cfgs=[dict()] * 3), 'layer_cfgs'),
    (dict(arch=dict(base='cbt-tiny', embed_dims=100)), 'embed_dims'),
])
def test_build_errors_name_the_parameter(kwargs, match):
    kwargs = copy.deepcopy(kwargs)
    kwargs.setdefault('arch', 'cbt-tiny')
    with pytest.raises(ValueError, match=match):
        WhiteBoxViT(**kwargs)


def test_registered_in_both_scopes():
    from mmpretrain.registry import MODELS as PRETRAIN
    from mmseg.registry import MODELS as SEG
    assert PRETRAIN.get('WhiteBoxViT') is WhiteBoxViT
    assert SEG.get('WhiteBoxViT') is WhiteBoxViT


def test_hw_shape_is_validated_once_per_forward(monkeypatch):
    """The patch grid is checked where it enters (the backbone, the head), not again in
    each block's attention; an attention given it for another token count checks it."""
    from mmcbsa.models.attentions import base
    from mmcbsa.models.decode_heads import CBTHead
    calls = []
    check = base.validate_hw
    monkeypatch.setattr(base, 'validate_hw', lambda *a: calls.append(a[2]) or check(*a))
    model = WhiteBoxViT(dict(base='cbt-tiny', embed_dims=32, num_layers=3, num_heads=2,
                             attn_cfg=dict(head_dims=16, num_reps=4)),
                        img_size=64, out_type='featmap')
    feats = model(torch.randn(1, 3, 64, 80))
    assert calls == ['WhiteBoxViT']
    calls.clear()
    head = CBTHead(in_channels=32, channels=16, num_classes=3, num_layers=2, num_heads=2,
                   head_dims=8, num_reps=4)
    head(list(feats))
    assert calls == ['CBTHead']
    # a checked grid is trusted for its own token count only
    grid = base.check_hw_shape(torch.zeros(1, 21, 4), (4, 5), 'test')
    assert grid == (4, 5) and grid.num_tokens == 21
    assert base.patch_span(21, grid, False, 'test') == (1, 4, 5)
    with pytest.raises(ValueError, match=r'hw_shape=\(4, 5\) needs h\*w <= N \(N=19'):
        base.patch_span(19, grid, False, 'CBSA')
