"""tools/model_converters/official2mmcbsa.py end to end: every reference fixture
saved the way the official training scripts save checkpoints, converted with nothing but
the two paths (plus --head-dims for the MSSA fixture, whose head width is not the
official 64), built from the config it wrote, loaded, and run on the fixture's input;
full Segmenter checkpoints (random encoder + fixture decoder) against an encoder
forward written here; MiTA-DeiT (no model-level fixture: a random official-layout state
dict made from our own MiTA-DeiT, renamed to timm's names here) against that model;
CBT-B/L-sized checkpoints recognised and inheriting their configs; every release config
(meta tensors in its reference layout) recognised and inherited as it is; every refusal
with its message and exit status; reading and writing checkpoints."""
import argparse
import importlib.util
import io
import math
import os
import pathlib
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import fixture_dir, load_fixture
from mmengine.config import Config
from mmengine.registry import DefaultScope, init_default_scope
from mmengine.runner import load_checkpoint
from seg_helpers import check_head_matches_fixture, randomise_layer_norms

from mmcbsa.converters import ConversionError, read_reference_checkpoint, save_converted
from mmcbsa.models.backbones import WhiteBoxViT

TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / 'tools' / 'model_converters' / 'official2mmcbsa.py'
_CLI = {}


def _cli():
    if 'module' not in _CLI:
        spec = importlib.util.spec_from_file_location('official2mmcbsa', TOOL)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _CLI['module'] = module
    return _CLI['module']


def _run(capsys, *args):
    rc = _cli().main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _build(cfg_path):
    """The model of a written config, in its own scope's registry."""
    cfg = Config.fromfile(str(cfg_path))
    init_default_scope(cfg.default_scope)
    if cfg.default_scope == 'mmseg':
        from mmseg.registry import MODELS
    else:
        from mmpretrain.registry import MODELS
    return cfg, MODELS.build(cfg.model).eval()


# --------------------------------------------- how the official training scripts save
def _save_cbsa_main(sd, path, **_):
    """CBSA_image_classification/main.py: DataParallel model, 'state_dict' entry."""
    torch.save({'epoch': 150, 'arch': 'Ours_small',
                'state_dict': {'module.' + k: v for k, v in sd.items()},
                'best_acc1': torch.tensor(71.4),
                'optimizer': {'state': {}, 'param_groups': [{'lr': 2e-4, 'params': [0]}]},
                'scheduler': {'base_lrs': [2e-4], 'last_epoch': 150, 'lr_lambdas': [None]}},
               path)


def _save_deit_main(sd, path, **args):
    """DeiT-style main.py (MiTA-DeiT, PrimalAttention_CV): 'model' + EMA + args."""
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}  # not the model
    torch.save({'model': dict(sd), 'optimizer': {'state': {}, 'param_groups': []},
                'lr_scheduler': {'t_in_epochs': True, 'base_values': [5e-4]}, 'epoch': 299,
                'model_ema': ema, 'scaler': {'scale': 65536.0, '_growth_tracker': 0},
                'args': argparse.Namespace(model='deit_small_patch16_224', input_size=224,
                                           output_dir='out', **args)}, path)


def _save_segmenter_train(sd, path, **_):
    """Segmenter's segm/train.py (DEPICT, CBT segmentation): 'model' snapshot."""
    torch.save({'model': dict(sd), 'optimizer': {'state': {}, 'param_groups': []},
                'n_cls': 150, 'lr_scheduler': {'last_epoch': 5, 'power': 0.9}, 'epoch': 63},
               path)


# ------------------------------------------------------ every fixture file, explicitly
_CLASSIFIER = dict(scope='mmpretrain')
_DECODER = dict(scope='mmseg', save=_save_segmenter_train)
_ATTENTION = 'not a released model checkpoint; attention modules are converted in Python'
EXPECT = {
    'vit_cbsa_ista_classifier': dict(_CLASSIFIER, kind='cbt-classifier', save=_save_cbsa_main),
    # dim_head 32 in the fixture; the official CRATE/CBT head width (the default) is 64
    'vit_mssa_ista_classifier': dict(_CLASSIFIER, kind='crate-classifier',
                                     save=_save_cbsa_main, args=['--head-dims', '32']),
    'vit_tssa_ista_classifier': dict(_CLASSIFIER, kind='tost-classifier', save=_save_cbsa_main),
    'primal_deit_classifier': dict(_CLASSIFIER, kind='primal-deit', save=_save_deit_main),
    'primalformer_classifier': dict(_CLASSIFIER, kind='primalformer', save=_save_deit_main),
    'depict_sa_decoder': dict(_DECODER, kind='depict-sa-decoder'),
    'depict_ca_decoder': dict(_DECODER, kind='depict-ca-decoder'),
    'cbt_decoder': dict(_DECODER, kind='cbt-decoder'),
    'cbsa_attention': dict(refused=f'holds a CBSA attention module .*{_ATTENTION}'),
    'mssa_attention': dict(refused=f'holds an MSSA attention module .*{_ATTENTION}'),
    'tssa_attention': dict(refused=f'holds a TSSA attention module .*{_ATTENTION}'),
    'mita_attention': dict(refused=f'holds a softmax-layout attention module .*{_ATTENTION}'),
    'adapted_vit_attention': dict(
        refused=f'holds a softmax-layout attention module .*{_ATTENTION}'),
}


def _all_fixture_files():
    files = sorted(fixture_dir().glob('*.pt'))
    if not files:
        return [pytest.param(None, id='no-fixtures')]
    return [pytest.param(p, id=p.stem) for p in files]


@pytest.mark.parametrize('path', _all_fixture_files())
def test_every_fixture_file_is_converted_or_refused(path, tmp_path, capsys):
    assert path is not None, f'no fixture files in {fixture_dir()}'
    assert path.stem in EXPECT, (f'fixture {path.name} has no expectation: say in EXPECT '
                                 'whether official2mmcbsa converts it (and to what) or refuses it')
    expect = EXPECT[path.stem]
    fx = load_fixture(path)
    src, dst = tmp_path / 'official.pth', tmp_path / 'out' / 'converted.pth'
    dst_py = dst.with_suffix('.py')
    if 'refused' in expect:
        _save_segmenter_train(fx['state_dict'], src)
        rc, out, err = _run(capsys, src, dst)
        assert rc == 2 and out == ''
        assert len(err.strip().splitlines()) == 1, err
        assert re.search(expect['refused'], err), err
        assert not dst.exists() and not dst_py.exists()
        return

    expect['save'](fx['state_dict'], src)
    rc, out, err = _run(capsys, src, dst, *expect.get('args', []))
    assert rc == 0, err
    assert f"recognised: {expect['kind']} -- " in out
    assert 'source keys not used: none' in out
    ckpt = torch.load(dst, map_location='cpu', weights_only=True)
    assert ckpt['meta']['kind'] == expect['kind']
    assert ckpt['meta']['converted_from'] == 'official.pth'
    assert Path(ckpt['meta']['config']) == dst_py.resolve()

    # the written config inherits a committed release config and only overrides it
    assert re.search(rf"^_base_ = \[\n    '{REPO / 'configs'}/\w+/[\w.-]+\.py',\n\]$",
                     dst_py.read_text(), re.M), dst_py.read_text()
    cfg, model = _build(dst_py)
    assert cfg.default_scope == expect['scope']
    if expect['scope'] == 'mmpretrain':
        assert 'model keys not filled: none' in out
        n_cls = fx['output'].shape[-1]  # the release's ImageNet test set has 1000 classes
        assert (n_cls == 1000) != (f"test dataset (ImageNet) has 1000 classes, the model "
                                   f"predicts {n_cls}: set the dataset" in out)
        load_checkpoint(model, str(dst), map_location='cpu', strict=True)
        with torch.no_grad():
            logits = model(fx['input'], mode='tensor')
        assert logits.shape == fx['output'].shape
        assert (logits - fx['output']).abs().max().item() <= TOL
    else:
        # decoder only: the encoder is named as not filled, the decode head is complete
        assert 'under backbone. -- the encoder is not in this checkpoint (decoder only)' in out
        head = {k[len('decode_head.'):]: v for k, v in ckpt['state_dict'].items()}
        assert all(k.startswith('decode_head.') for k in ckpt['state_dict'])
        model.decode_head.load_state_dict(head, strict=True)
        check_head_matches_fixture(model.decode_head, fx, TOL)


# ------------------------------------------------------------ full Segmenter checkpoints
def _segmenter_encoder(d, depth, patch, grid, mlp, n_cls, seed=0, empty=False):
    """Random Segmenter ViT encoder parameters under their official (timm) names
    (``empty``: meta tensors, names and shapes only)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return _meta(*shape) if empty else torch.randn(*shape, generator=g) * scale

    sd = {'cls_token': r(1, 1, d), 'pos_embed': r(1, 1 + grid * grid, d),
          'patch_embed.proj.weight': r(d, 3, patch, patch, scale=0.05),
          'patch_embed.proj.bias': r(d), 'norm.weight': 1 + r(d), 'norm.bias': r(d),
          'head.weight': r(n_cls, d), 'head.bias': r(n_cls)}
    for i in range(depth):
        b = f'blocks.{i}.'
        sd.update({b + 'norm1.weight': 1 + r(d), b + 'norm1.bias': r(d),
                   b + 'attn.qkv.weight': r(3 * d, d), b + 'attn.qkv.bias': r(3 * d),
                   b + 'attn.proj.weight': r(d, d), b + 'attn.proj.bias': r(d),
                   b + 'norm2.weight': 1 + r(d), b + 'norm2.bias': r(d),
                   b + 'mlp.fc1.weight': r(mlp, d), b + 'mlp.fc1.bias': r(mlp),
                   b + 'mlp.fc2.weight': r(d, mlp), b + 'mlp.fc2.bias': r(d)})
    return sd


def _segmenter_encoder_forward(sd, img, heads, patch):
    """Segmenter's encoder written out: conv patches, [CLS; patches] + pos (bilinear
    resize of the grid), pre-norm blocks (nn.LayerNorm eps 1e-5, softmax attention, exact
    GELU MLP), final norm; returns the patch tokens as (B, d, h, w)."""
    def ln(t, name):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-5) * sd[name + '.weight'] + sd[name + '.bias']

    b, _, hh, ww = img.shape
    h, w = hh // patch, ww // patch
    x = F.conv2d(img, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    d = x.shape[-1]
    pos = sd['pos_embed']
    side = math.isqrt(pos.shape[1] - 1)
    grid = pos[:, 1:].reshape(1, side, side, d).permute(0, 3, 1, 2)
    if (side, side) != (h, w):
        grid = F.interpolate(grid, size=(h, w), mode='bilinear', align_corners=False)
    pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
    x = torch.cat([sd['cls_token'].expand(b, -1, -1), x], dim=1) + pos
    depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
    p = d // heads
    for i in range(depth):
        pre = f'blocks.{i}.'
        u = ln(x, pre + 'norm1')
        qkv = u @ sd[pre + 'attn.qkv.weight'].T + sd[pre + 'attn.qkv.bias']
        q, k, v = (t.reshape(b, -1, heads, p).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(p), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, -1, d)
        x = x + o @ sd[pre + 'attn.proj.weight'].T + sd[pre + 'attn.proj.bias']
        u = ln(x, pre + 'norm2')
        u = F.gelu(u @ sd[pre + 'mlp.fc1.weight'].T + sd[pre + 'mlp.fc1.bias'])
        x = x + u @ sd[pre + 'mlp.fc2.weight'].T + sd[pre + 'mlp.fc2.bias']
    x = ln(x, 'norm')
    return x[:, 1:].transpose(1, 2).reshape(b, d, h, w)


@pytest.mark.parametrize('stem,kind', [('depict_sa_decoder', 'depict-sa-segmenter'),
                                       ('depict_ca_decoder', 'depict-ca-segmenter'),
                                       ('cbt_decoder', 'cbt-segmenter')])
def test_full_segmenter_checkpoint(stem, kind, tmp_path, capsys):
    path = fixture_dir() / f'{stem}.pt'
    assert path.is_file(), f'missing fixture {path}'
    fx = load_fixture(path)
    cfg = fx['config']
    d, patch = cfg['d_model'], cfg['patch_size']
    grid = cfg['im_size'][0] // patch
    encoder = _segmenter_encoder(d, depth=2, patch=patch, grid=grid, mlp=2 * d,
                                 n_cls=cfg['n_cls'])
    sd = {'encoder.' + k: v for k, v in encoder.items()}
    sd.update({'decoder.' + k: v for k, v in fx['state_dict'].items()})
    src, dst = tmp_path / 'segmenter.pth', tmp_path / 'seg.pth'
    _save_segmenter_train(sd, src)
    # encoder width 96 is not a multiple of the default head width 64: say the heads
    rc, out, err = _run(capsys, src, dst, '--encoder-num-heads', 3)
    assert rc == 0, err
    assert f'recognised: {kind} -- ' in out and 'model keys not filled: none' in out
    reason = "(Segmenter encoder's classification head (mmseg's ViT has none))"
    assert f'source keys not used: encoder.head.weight {reason}; encoder.head.bias {reason}' \
        in out
    _, model = _build(dst.with_suffix('.py'))
    load_checkpoint(model, str(dst), map_location='cpu', strict=True)
    check_head_matches_fixture(model.decode_head, fx, TOL)
    for hw in [(grid * patch, grid * patch), (grid * patch - 2 * patch, grid * patch + patch)]:
        img = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ours = model.backbone(img)[-1]
        ref = _segmenter_encoder_forward(encoder, img, heads=3, patch=patch)
        assert (ours - ref).abs().max().item() <= TOL, hw


# ------------------------------------------------------------------------ MiTA-DeiT
def _to_timm(sd):
    """Our MiTA-DeiT parameter names -> the official (timm DeiT + MiTA module) names."""
    out = {}
    for k, v in sd.items():
        t = k.replace('backbone.patch_embed.projection.', 'patch_embed.proj.')
        t = t.replace('backbone.layers.', 'blocks.').replace('backbone.', '')
        t = t.replace('.ffn.layers.0.0.', '.mlp.fc1.').replace('.ffn.layers.1.', '.mlp.fc2.')
        t = t.replace('head.fc.', 'head.')
        out[t] = v
    return out


@pytest.mark.parametrize('dwc,gate,kv_topk', [(False, False, 4), (True, False, 5),
                                              (True, True, 5)])
def test_mita_deit_roundtrip(dwc, gate, kv_topk, tmp_path, capsys):
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    topk = 25 if dwc else kv_topk ** 2  # the DWC modules route pool_size² keys
    direct = MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='WhiteBoxViT', img_size=80, patch_size=16, out_type='cls_token',
                      arch=dict(base='mita-deit-tiny', embed_dims=128, num_layers=2,
                                num_heads=2, attn_cfg=dict(num_landmarks=25, topk=topk,
                                                           dwc=dwc, gate=gate,
                                                           legacy_pooling=True))),
        head=dict(type='LinearClsHead', num_classes=7, in_channels=128))).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in direct.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    randomise_layer_norms(direct)
    official = _to_timm(direct.state_dict())
    assert ('blocks.0.attn.dwc.weight' in official) == dwc and 'head.weight' in official
    assert ('blocks.0.attn.qkvg.weight' in official) == gate
    src, dst = tmp_path / 'mita.pth', tmp_path / 'mita_converted.pth'
    _save_deit_main(official, src, pool_size=5, kv_topk=kv_topk)
    rc, out, err = _run(capsys, src, dst)
    assert rc == 0, err
    kind = 'mita-dwc-gate-deit' if gate else 'mita-dwc-deit' if dwc else 'mita-deit'
    assert f'recognised: {kind} -- ' in out
    assert 'num_heads: 2 heads of the official width 64' in out
    if not dwc:
        assert f"kv_topk: {kv_topk}, the checkpoint's args.kv_topk" in out
    _, model = _build(dst.with_suffix('.py'))
    load_checkpoint(model, str(dst), map_location='cpu', strict=True)
    img = torch.randn(2, 3, 80, 80, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = (model(img, mode='tensor') - direct(img, mode='tensor')).abs().max().item()
    assert err <= TOL


# ---------------------------------------------------- CBT-B / CBT-L sized checkpoints
def _official_cbt(d, depth, heads, num_classes, grid, p=64, empty=False):
    """A random checkpoint in the CBSA repository's layout (models.VisionTransformer
    with CBSA): conv stem 3 -> d/8 -> d/4 -> d/2 -> d, blocks, LN + Linear head
    (``empty``: uninitialised tensors, when only names and shapes matter)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.empty(*shape) if empty else torch.randn(*shape, generator=g) * 0.02

    sd = {}
    chans = [3, d // 8, d // 4, d // 2, d]
    for k in range(4):
        s = f'to_patch_embedding.proj.{2 * k}.'
        sd[s + '0.weight'] = r(chans[k + 1], chans[k], 3, 3)
        sd.update({s + '1.weight': 1 + r(chans[k + 1]), s + '1.bias': r(chans[k + 1]),
                   s + '1.running_mean': r(chans[k + 1]),
                   s + '1.running_var': 1 + r(chans[k + 1]).abs(),
                   s + '1.num_batches_tracked': torch.tensor(10)})
    sd['cls_token'], sd['pos_embedding'] = r(1, 1, d), r(1, 1 + grid * grid, d)
    for i in range(depth):
        s = f'transformer.layers.{i}.'
        sd.update({s + '0.norm.weight': 1 + r(d), s + '0.norm.bias': r(d),
                   s + '0.fn.step_x': r(heads, 1, 1), s + '0.fn.step_rep': r(heads, 1, 1),
                   s + '0.fn.proj.weight': r(heads * p, d),
                   s + '0.fn.to_out.weight': r(d, heads * p), s + '0.fn.to_out.bias': r(d),
                   s + '1.norm.weight': 1 + r(d), s + '1.norm.bias': r(d),
                   s + '1.fn.weight': r(d, d)})
    sd.update({'mlp_head.0.weight': 1 + r(d), 'mlp_head.0.bias': r(d),
               'mlp_head.1.weight': r(num_classes, d), 'mlp_head.1.bias': r(num_classes)})
    return sd


def test_cbt_tiny_inherits_its_config(tmp_path, capsys):
    # 32-px images (2x2 patches) keep it fast: the converter reads the size off pos_embedding
    src, dst = tmp_path / 'cbt-tiny.pth', tmp_path / 'cbt-tiny_converted.pth'
    _save_cbsa_main(_official_cbt(192, 12, 3, 1000, grid=2), src)
    rc, out, err = _run(capsys, src, dst)
    assert rc == 0, err
    assert 'recognised: cbt-classifier -- ' in out
    assert 'embed_dims=192, num_layers=12, num_heads=3, head_dims=64' in out
    config = (REPO / 'configs' / 'cbt' / 'cbt-tiny_8xb32-lion-150e_in1k.py').resolve()
    text = dst.with_suffix('.py').read_text()
    assert f"_base_ = [\n    '{config}',\n]\nmodel = dict(\n    backbone=dict(\n        " \
        'img_size=32, layer_cfgs=dict(attn_cfg=dict(legacy_pooling=True))))\n' in text, text
    assert 'model keys not filled: none' in out
    cfg, model = _build(dst.with_suffix('.py'))
    assert cfg.model.backbone.arch == 'cbt-tiny' and cfg.model.backbone.img_size == 32
    assert cfg.model.backbone.layer_cfgs.attn_cfg.legacy_pooling is True
    assert all(layer.attn.legacy_pooling for layer in model.backbone.layers)
    load_checkpoint(model, str(dst), map_location='cpu', strict=True)


@pytest.mark.parametrize('arch,d,depth,heads', [('cbt-base', 768, 12, 12),
                                                ('cbt-large', 1024, 24, 16)])
def test_cbt_base_and_large_are_recognised_with_their_configs(arch, d, depth, heads):
    """CBT-B/L (which the reference code cannot build) through the converter's library
    steps: recognised, sizes read, their release config chosen and adapted, converted. No
    model is built here (26M / 83M parameters); the command-line path is the CBT-T test's."""
    from mmcbsa.converters import ConvertOptions, recognise
    from mmcbsa.converters.official import release_overrides
    sd = _official_cbt(d, depth, heads, 1000, grid=2, empty=True)
    kind = recognise(sd)
    assert kind.name == 'cbt-classifier'
    rec = kind.infer(sd, ConvertOptions(), {})
    assert rec.sizes == dict(embed_dims=d, num_layers=depth, num_heads=heads, head_dims=64,
                             img_size=32, patch_size=16, num_classes=1000, num_reps=64)
    config = f'cbt/{arch}_8xb32-lion-150e_in1k.py'
    assert kind.releases(rec.sizes)[0] == config
    over = release_overrides(kind, rec.sizes, Config.fromfile(REPO / 'configs' / config).model)
    assert over == {'backbone': {'img_size': 32,
                                 'layer_cfgs': {'attn_cfg': {'legacy_pooling': True}}}}
    converted, unused = kind.convert(sd, rec.sizes)
    assert len(converted) == len(sd) and unused == {}
    assert converted[f'backbone.layers.{depth - 1}.attn.in_proj.weight'].shape == (d, d)


def _meta(*shape):
    return torch.empty(*shape, device='meta')


def _official_decoder(head):
    """A decoder in the official layout (DEPICT-SA / -CA, CBT) with the sizes of a
    config's ``decode_head``: meta tensors (names and shapes only)."""
    d, k, h, p = head.channels, head.num_classes, head.num_heads, head.head_dims
    if head.type == 'CBTHead':
        leaves = {'fn.proj.weight': (h * p, d), 'fn.step_x': (h, 1, 1),
                  'fn.step_rep': (h, 1, 1), 'fn.to_out.weight': (d, h * p), 'fn.to_out.bias': (d, )}
        stacks, norms = {'net': (head.num_layers, leaves)}, ['decoder_norm']
    else:
        stacks = {'net' if head.mode == 'sa' else 'snet': (
            head.num_layers, {'fn.proj': (h * p, d), 'fn.step_size': (1, )})}
        norms = ['decoder_norm'] if head.mode == 'sa' else ['snorm', 'cnorm']
        if head.mode == 'ca':
            stacks['cnet'] = (head.ca_num_layers, {'fn.proj': (h * head.ca_head_dims, d),
                                                   'fn.step_size': (1, )})
    sd = {'cls_emb': _meta(1, k, d), 'mask_norm.weight': _meta(k), 'mask_norm.bias': _meta(k)}
    for stack, (n, leaves) in stacks.items():
        for i in range(n):
            sd.update({f'{stack}.layers.{i}.norm.{w}': _meta(d) for w in ('weight', 'bias')})
            sd.update({f'{stack}.layers.{i}.{name}': _meta(*shape)
                       for name, shape in leaves.items()})
    sd.update({f'{n}.{w}': _meta(d) for n in norms for w in ('weight', 'bias')})
    return sd


def _to_official_white_box(sd, attn):
    """A WhiteBoxViT classifier's state dict in the CBSA repository's layout."""
    out = {}
    for k, v in sd.items():
        m = re.match(r'backbone\.patch_embed\.convs\.(\d+)\.(conv|bn)\.(.+)', k)
        if m:
            out[f'to_patch_embedding.proj.{2 * int(m[1])}.{int(m[2] == "bn")}.{m[3]}'] = v
            continue
        m = re.match(r'backbone\.layers\.(\d+)\.(\w+)\.(.+)', k)
        if m:
            leaf = {'in_proj.weight': 'proj.weight' if attn == 'CBSA' else 'qkv.weight',
                    'out_proj.weight': 'to_out.weight', 'out_proj.bias': 'to_out.bias'}
            part = {'norm1': '0.norm', 'norm2': '1.norm', 'ffn': '1.fn', 'attn': '0.fn'}[m[2]]
            v = v.reshape(-1, 1, 1) if m[3] in ('step_rep', 'step_x') else (
                v.reshape(-1, 1) if m[3] == 'temp' else v)
            out[f'transformer.layers.{m[1]}.{part}.{leaf.get(m[3], m[3])}'] = v
            continue
        out[{'backbone.cls_token': 'cls_token', 'backbone.pos_embed': 'pos_embedding'}.get(k) or
            k.replace('backbone.norm.', 'mlp_head.0.').replace('head.fc.', 'mlp_head.1.')] = v
    return out


def _to_official_timm(sd):
    """A timm-layout WhiteBoxViT (DeiT head) in the official names, Primal leaves too."""
    out = {}
    for k, v in _to_timm(sd).items():
        k = k.replace('head.layers.head.', 'head.').replace('.w_e', '.we').replace('.w_r', '.wr')
        out[k.replace('.lambdas', '.Lambda').replace('.concat_proj.', '.concate_weight.')] = v
    return out


def _releases():
    """Every config a released checkpoint converts to (the metafiles' ``Converted From``),
    and the CRATE / ToST / Primal configs the converter inherits for those kinds."""
    found = []
    for meta in sorted((REPO / 'configs').glob('*/metafile.yml')):
        found += [m['Config'] for m in yaml.safe_load(meta.read_text()).get('Models') or []
                  if 'Converted From' in m]
    return found + [str(p.relative_to(REPO)) for folder in ('crate', 'tost', 'primal')
                    for p in sorted((REPO / 'configs' / folder).glob('*.py'))]


@pytest.mark.parametrize('config', _releases())
def test_every_release_is_recognised_and_inherited_as_it_is(config):
    """The model of each release config, written in its reference layout (meta tensors:
    names and shapes only), is recognised, inherits that very config and overrides only
    what the released weights were trained with: legacy pooling (CBSA, MiTA), Segmenter's
    encoder settings; its decoder alone inherits the same config and overrides nothing."""
    from mmcbsa.converters import ConvertOptions, recognise
    from mmcbsa.converters.official import release_overrides
    cfg = Config.fromfile(REPO / config)
    legacy = {'backbone': {'layer_cfgs': {'attn_cfg': {'legacy_pooling': True}}}}
    if cfg.default_scope == 'mmseg':
        bb, head = cfg.model.backbone, cfg.model.decode_head
        grid = bb.img_size[0] // bb.patch_size
        encoder = _segmenter_encoder(bb.embed_dims, bb.num_layers, bb.patch_size, grid,
                                     int(bb.get('mlp_ratio', 4) * bb.embed_dims), 1000,
                                     empty=True)
        decoder = _official_decoder(head)
        full = {f'encoder.{k}': v for k, v in encoder.items()}
        full.update({f'decoder.{k}': v for k, v in decoder.items()})
        cases = [(full, {'pretrained': None, 'backbone': {
            'patch_bias': True, 'norm_cfg': {'eps': 1e-5}, 'interpolate_mode': 'bilinear'}}),
            (decoder, {})]
    else:
        from mmpretrain.registry import MODELS
        with DefaultScope.overwrite_default_scope('mmpretrain'), torch.device('meta'):
            model = MODELS.build(cfg.model)
        arch = WhiteBoxViT.resolve_arch(cfg.model.backbone.arch)
        attn = arch['attn_cfg']['type']
        if arch['stem'] == 'conv':
            sd = _to_official_white_box(model.state_dict(), attn)
        else:
            sd = _to_official_timm(model.state_dict())
        cases = [(sd, legacy if attn in ('CBSA', 'MiTA') else {})]
    for sd, over in cases:
        kind = recognise(sd)
        rec = kind.infer(sd, ConvertOptions(), {})
        assert kind.releases(rec.sizes)[0] == config[len('configs/'):], kind.name
        assert release_overrides(kind, rec.sizes, cfg.model) == over, kind.name
        converted, unused = kind.convert(sd, rec.sizes)  # unused: the encoder's own head
        assert len(converted) + len(unused) == len(sd) and len(unused) in (0, 2)


# ------------------------------------------------------------------------- refusals
def _fixture_sd(stem):
    return load_fixture(fixture_dir() / f'{stem}.pt')['state_dict']


def _malicious_pickle():
    """Pickle opcodes calling os.system('echo') when unpickled: written as bytes here,
    never executed (protocol 2: GLOBAL os.system, a 1-tuple argument, REDUCE, STOP)."""
    return b'\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00echoq\x01\x85q\x02Rq\x03.'


def _zip_with_pickle(tmp_path, payload):
    """A zip-format torch checkpoint whose data.pkl is ``payload``."""
    good = tmp_path / 'good.pth'
    torch.save({'model': {'w': torch.ones(2)}}, good)
    out = tmp_path / 'zip_payload.pth'
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(out, 'w') as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            zout.writestr(item, payload if item.filename.endswith('data.pkl') else data)
    return out


def test_refusals_name_the_problem(tmp_path, capsys):
    out_path = tmp_path / 'out.pth'

    def refused(src, *args, match):
        rc, out, err = _run(capsys, src, out_path, *args)
        assert rc == 2 and out == '', (rc, out, err)
        assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err, err
        assert err.startswith('official2mmcbsa: error: '), err
        assert re.search(match, err), err
        assert not out_path.exists() and not out_path.with_suffix('.py').exists()

    cbsa = tmp_path / 'cbsa.pth'
    _save_cbsa_main(_fixture_sd('vit_cbsa_ista_classifier'), cbsa)
    mssa = tmp_path / 'mssa.pth'
    _save_cbsa_main(_fixture_sd('vit_mssa_ista_classifier'), mssa)

    # files that are not (readable, weights-only) checkpoints
    refused(tmp_path / 'nowhere.pth', match='nowhere.pth: no such file')
    (tmp_path / 'empty.pth').write_bytes(b'')
    refused(tmp_path / 'empty.pth', match=r'is empty \(0 bytes\)')
    data = cbsa.read_bytes()
    (tmp_path / 'truncated.pth').write_bytes(data[:len(data) // 2])
    refused(tmp_path / 'truncated.pth', match='truncated.pth is truncated or corrupt')
    (tmp_path / 'text.pth').write_text('not a checkpoint at all\n' * 20)
    refused(tmp_path / 'text.pth', match='text.pth is truncated or corrupt')
    (tmp_path / 'legacy_evil.pth').write_bytes(_malicious_pickle())
    refused(tmp_path / 'legacy_evil.pth',
            match=r'is not a weights-only checkpoint: it needs os.system to load')
    refused(_zip_with_pickle(tmp_path, _malicious_pickle()),
            match=r'is not a weights-only checkpoint: it needs os.system to load')
    torch.save({'model': {'w': torch.ones(2)}, 'out': pathlib.PurePosixPath('/x')},
               tmp_path / 'object.pth')
    refused(tmp_path / 'object.pth', match=r'not a weights-only checkpoint: it needs '
            r'pathlib.PurePosixPath')
    torch.save({'model': {'w': torch.ones(2), 'step': 3}}, tmp_path / 'nontensor.pth')
    refused(tmp_path / 'nontensor.pth', match=r"entry \['model'\]\['step'\] is a int, not a "
            'tensor')
    torch.save([torch.ones(2)], tmp_path / 'list.pth')
    refused(tmp_path / 'list.pth', match='holds a list, not a dict of parameters')

    # unknown kinds
    torch.save({'model': {'encoder.blocks.0.x': torch.ones(2), 'foo.bar': torch.ones(3, 4)}},
               tmp_path / 'unknown.pth')
    refused(tmp_path / 'unknown.pth', match=r'unknown kind of checkpoint: 2 tensors under '
            r'encoder \(1\), foo \(1\); first: encoder.blocks.0.x \(2,\), foo.bar \(3, 4\)')
    torch.save({'state_dict': {'backbone.w': torch.ones(2)}, 'meta': {}},
               tmp_path / 'ours.pth')
    refused(tmp_path / 'ours.pth', match='looks like an mmcbsa / OpenMMLab checkpoint already')

    # sizes: given values that contradict the tensors, impossible values, wrong options
    step_rep = r'transformer.layers.0.0.fn.step_rep'
    refused(cbsa, '--num-heads', 3, match=f'--num-heads 3 contradicts {step_rep}, which '
            'holds 2 heads')
    refused(cbsa, '--head-dims', 16, match=r'--head-dims 16 contradicts the tensors: .* '
            'i.e. head width 32')
    refused(mssa, '--head-dims', 48, match=r'has 64 rows, not a multiple of the head width '
            r'48 \(--head-dims\)')
    refused(mssa, '--num-heads', 2, '--head-dims', 16,
            match=r'--num-heads 2 x --head-dims 16 = 32, but .*qkv.weight has 64 rows')
    refused(mssa, '--head-dims', 0, match='--head-dims must be a positive integer, got 0')
    refused(cbsa, '--num-reps', 50, match=r'impossible model: .*num_reps')
    refused(cbsa, '--rank-multi', 2, match='--rank-multi does not apply to a cbt-classifier '
            'checkpoint')
    primal = tmp_path / 'primal.pth'
    _save_deit_main(_fixture_sd('primal_deit_classifier'), primal)
    refused(primal, '--rank-multi', 10, match=r'--rank-multi 10 gives n = min\(17, 4\*10\) = '
            r'17 .* n = 8 \(the tensors say --rank-multi 2\)')
    bad = dict(_fixture_sd('vit_cbsa_ista_classifier'))
    bad['transformer.layers.1.0.fn.proj.weight'] = torch.zeros(96, 64)
    _save_cbsa_main(bad, tmp_path / 'inconsistent.pth')
    refused(tmp_path / 'inconsistent.pth', match=r'do not fit a cbt-classifier model of the '
            r'sizes read .*1 shape mismatches, checkpoint vs model \(backbone.layers.1.attn.'
            r'in_proj.weight \(96, 64\) vs \(64, 64\)\)')
    seg = {'encoder.' + k: v for k, v in _segmenter_encoder(128, 1, 16, 2, 256, 5).items()}
    seg.update({'decoder.' + k: v for k, v in _fixture_sd('cbt_decoder').items()})
    torch.save({'model': seg}, tmp_path / 'widths.pth')
    refused(tmp_path / 'widths.pth', match=r'the encoder is 128 wide \(encoder.cls_token\) '
            r'but the decoder reads 96-wide tokens')
    rc, _, err = _run(capsys, cbsa, tmp_path / 'out.py')
    assert rc == 2 and 'must not be a .py file' in err
    for folder in (str(tmp_path), f'{tmp_path}/new/'):  # an existing folder, a trailing /
        rc, out, err = _run(capsys, cbsa, folder)
        assert rc == 2 and out == '' and err.strip() == (
            f'official2mmcbsa: error: {folder} is a directory: give the checkpoint to write '
            f'as a file name, e.g. {os.path.join(folder, "model.pth")}'), err
    assert not Path(f'{tmp_path}.py').exists()
    with pytest.raises(SystemExit) as exit_info:
        _cli().main([str(cbsa)])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_refusal_from_the_command_line_has_no_traceback(tmp_path):
    evil = tmp_path / 'evil.pth'
    evil.write_bytes(_malicious_pickle())
    proc = subprocess.run([sys.executable, str(TOOL), str(evil), str(tmp_path / 'x.pth')],
                          capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if 'Warning' not in ln
             and not ln.startswith('  ')]  # import-time library deprecation warnings
    assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert lines[0].startswith('official2mmcbsa: error: ') and 'os.system' in lines[0]
    assert proc.stdout == ''


# --------------------------------------------------------- reading/writing checkpoints
def test_read_reference_checkpoint_unwraps_and_strips_module(tmp_path):
    a, b, c = torch.arange(3.), torch.ones(2, 2), torch.zeros(1)
    params = {'module.blocks.0.w': a, 'module.module.x': b, 'head.module.bias': c}
    nested = {'state_dict': {'model': params, 'epoch': 4}, 'optimizer': {'lr': 0.1}}
    path = tmp_path / 'ref.pth'
    torch.save(nested, path)
    ckpt = read_reference_checkpoint(str(path))
    # one leading 'module.' goes; inner occurrences stay
    assert sorted(ckpt.state_dict) == ['blocks.0.w', 'head.module.bias', 'module.x']
    assert torch.equal(ckpt.state_dict['blocks.0.w'], a)
    assert torch.equal(ckpt.state_dict['module.x'], b)
    assert ckpt.wrappers == ['state_dict', 'model'] and ckpt.stripped_prefix == 2
    assert sorted(ckpt.extras) == ['optimizer']
    assert all(t.device.type == 'cpu' for t in ckpt.state_dict.values())
    for wrapped in ({'model': params}, {'state_dict': params}, params):
        for zip_format in (True, False):  # torch >= 1.6 files are zips; older ones are not
            torch.save(wrapped, path, _use_new_zipfile_serialization=zip_format)
            assert sorted(read_reference_checkpoint(str(path)).state_dict) == sorted(
                ckpt.state_dict)
    # DeiT-style: 'model' is taken, 'model_ema' is not; the args Namespace loads
    _save_deit_main({'w': a}, path, pool_size=5)
    ckpt = read_reference_checkpoint(str(path))
    assert ckpt.wrappers == ['model'] and torch.equal(ckpt.state_dict['w'], a)
    assert ckpt.extras['args'].pool_size == 5 and 'model_ema' in ckpt.extras
    torch.save({'module.w': a, 'w': b}, path)
    with pytest.raises(ConversionError, match="'w' appears twice"):
        read_reference_checkpoint(str(path))


def test_save_converted_layout_and_meta(tmp_path):
    sd = {'backbone.w': torch.randn(2, 3), 'head.fc.bias': torch.randn(4)}
    dst = tmp_path / 'new' / 'dir' / 'out.pth'
    save_converted(sd, str(dst), '/some/where/official_small.pth',
                   model=dict(type='X', depth=2), note='n')
    ckpt = torch.load(dst, map_location='cpu', weights_only=True)
    assert sorted(ckpt) == ['meta', 'state_dict']
    assert ckpt['meta'] == {'converted_from': 'official_small.pth',
                            'model': {'type': 'X', 'depth': 2}, 'note': 'n'}
    for k, v in sd.items():
        assert torch.equal(ckpt['state_dict'][k], v)


def test_malicious_pickle_is_not_executed(tmp_path, monkeypatch):
    """The refused file really is one that would run code under plain pickle."""
    calls = []
    monkeypatch.setattr('os.system', lambda cmd: calls.append(cmd) or 0)
    pickle.load(io.BytesIO(_malicious_pickle()))  # plain pickle would call os.system
    assert calls == ['echo']
    calls.clear()
    with pytest.raises(ConversionError, match='not a weights-only checkpoint'):
        path = tmp_path / 'evil.pth'
        path.write_bytes(_malicious_pickle())
        read_reference_checkpoint(str(path))
    assert calls == []


def test_destination_that_cannot_be_written_is_one_line(tmp_path, capsys):
    """A DST whose folder cannot be created (below a file, or in a place that does not
    exist and cannot be made) is a user's mistake: one line naming DST, exit status 2,
    nothing converted."""
    src = fixture_dir() / 'vit_cbsa_ista_classifier.pt'
    blocker = tmp_path / 'a-file'
    blocker.write_text('')
    for dst, why in ((blocker / 'model.pth', 'a file, not a directory'),
                     (pathlib.Path('/proc/no-such-dir/model.pth'), 'No such file or directory')):
        rc, out, err = _run(capsys, src, dst)
        assert rc == 2 and out == ''
        assert err.strip() == (f'official2mmcbsa: error: cannot write DST {dst}: {why}: '
                               f'{dst.parent}')


def test_missing_release_config_is_exit_status_1(tmp_path, capsys, monkeypatch):
    """A mmcbsa without the release configs (a broken install) cannot write DST.py: one
    line naming the configs it looked for, exit status 1, nothing written."""
    import mmcbsa.converters.official as official
    monkeypatch.setattr(official, 'configs_root', lambda: str(tmp_path / 'no-configs'))
    src, dst = tmp_path / 'cbsa.pth', tmp_path / 'out.pth'
    _save_cbsa_main(_fixture_sd('vit_cbsa_ista_classifier'), src)
    rc, out, err = _run(capsys, src, dst)
    assert rc == 1 and out == '' and len(err.strip().splitlines()) == 1, err
    assert "none of the cbt-classifier release configs ['cbt/cbt-small_" in err
    assert not dst.exists() and not dst.with_suffix('.py').exists()


def test_release_overrides_write_only_differences_and_replace_another_type():
    """Entries equal to the release's (or to the constructor default it leaves out) are
    not written; a sub-config of another type replaces the release's (``_delete_``)
    instead of being merged into it and keeping its stale keys."""
    from mmcbsa.converters.kinds import Kind
    from mmcbsa.converters.official import release_overrides

    class Toy(Kind):
        def model(self, sizes):
            return dict(neck=None, head=sizes['head'])

    release = dict(type='ImageClassifier', head=dict(
        type='VisionTransformerClsHead', num_classes=1000, in_channels=384))
    same = dict(type='VisionTransformerClsHead', num_classes=1000, hidden_dim=None)
    assert release_overrides(Toy(), dict(head=same), release) == {}
    other = dict(type='LinearClsHead', num_classes=10, in_channels=384)
    assert release_overrides(Toy(), dict(head=other), release) == {
        'head': dict(_delete_=True, **other)}
