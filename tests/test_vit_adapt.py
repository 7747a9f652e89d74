"""ViT adaptation to CBSA style (docs/mechanisms.md §8): ``AdaptedCBSA`` and the
``AdaptedVisionTransformer`` backbones of mmpretrain and mmseg.

* ``AdaptedCBSA`` against a hand-written reference IN this file (explicit loops over
  batch and heads, explicit pooling windows; none of mmcbsa's code), both poolings,
  non-square patch and representative grids, 0 / 1 / 2 prefix tokens; the recorded
  attention maps; gradients (fp32 against the reference, float64 gradcheck, bf16
  autocast); parity with the official fixtures; argument errors and warnings;
* mmpretrain's and mmseg's ``VisionTransformer`` adapted through one config key: state-dict
  keys, shapes and initialisation identical to the plain backbone; checkpoints of the plain
  model load unchanged through ``init_cfg=Pretrained`` and ``load_from`` (every tensor
  compared); keys that do not load are reported; adapted layers compute the reference at
  224 px and on non-square inputs, forward and backward;
* the configs of configs/vit_adapt: the README's short config, a train step of one config
  with a tiny arch, and the ADE20K config differing from its parent in the encoder type only.
"""
import copy
import logging
import math
import re
import uuid
import warnings
from pathlib import Path

import pytest
import torch
from conftest import fixture_params, load_fixture
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope, init_default_scope
from mmengine.runner import Runner
from mmpretrain.registry import MODELS as PRETRAIN_MODELS
from mmpretrain.structures import DataSample
from mmseg.registry import MODELS as SEG_MODELS
from torch.func import functional_call

import mmcbsa  # noqa: F401  (registers the modules)
from mmcbsa.models.attentions.base import merge_heads, split_heads  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ADAPT_DIR = REPO / 'configs' / 'vit_adapt'
TINY_ARCH = dict(embed_dims=32, num_layers=2, num_heads=2, feedforward_channels=64)


# ----------------------------------------------------------------------------------------
# hand-written reference (docs/mechanisms.md §8)
# ----------------------------------------------------------------------------------------
def ref_pool(img, grid):
    """img (h, w, C) -> (s_h * s_w, C): mean over PyTorch's adaptive windows
    rows [floor(i*h/s_h), ceil((i+1)*h/s_h)), likewise columns; row-major."""
    h, w, _ = img.shape
    sh, sw = grid
    out = []
    for i in range(sh):
        r0, r1 = (i * h) // sh, -(-((i + 1) * h) // sh)
        for j in range(sw):
            c0, c1 = (j * w) // sw, -(-((j + 1) * w) // sw)
            out.append(img[r0:r1, c0:c1].reshape(-1, img.shape[-1]).mean(0))
    return torch.stack(out)


def ref_adapted(x, w_qkv, b_qkv, w_proj, b_proj, heads, hw, grid, legacy=False):
    """Returns y (B, N, C) and the maps per (b, head): contract (m, N), broadcast (N, m)."""
    B, N, C = x.shape
    p = C // heads
    qkv = x @ w_qkv.T + (0 if b_qkv is None else b_qkv)
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    out = torch.zeros_like(q)
    contract = torch.zeros(B, heads, grid[0] * grid[1], N, dtype=x.dtype)
    broadcast = torch.zeros(B, heads, N, grid[0] * grid[1], dtype=x.dtype)
    for b in range(B):
        if legacy:  # first N-1 tokens in sequence order on a floor(sqrt(N)) square
            side = math.isqrt(N)
            q0_all = ref_pool(q[b, :N - 1].reshape(side, side, C), grid)
        else:  # the patch tokens (the last h*w) on their true grid
            h, w = hw
            q0_all = ref_pool(q[b, N - h * w:].reshape(h, w, C), grid)
        for hd in range(heads):
            sl = slice(hd * p, (hd + 1) * p)
            q0 = q0_all[:, sl]
            a = torch.softmax(q0 @ k[b, :, sl].T / math.sqrt(p), dim=1)  # over tokens
            delta = a @ v[b, :, sl]
            bc = torch.softmax(q[b, :, sl] @ q0.T / math.sqrt(p), dim=1)  # over reps
            out[b, :, sl] = bc @ delta
            contract[b, hd], broadcast[b, hd] = a, bc
    return out @ w_proj.T + (0 if b_proj is None else b_proj), contract, broadcast


def randomize(module, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def build_attn(**kwargs):
    return SEG_MODELS.build(dict(type='AdaptedCBSA', **kwargs))


def module_ref(model, x, hw, legacy=False):
    return ref_adapted(x, model.qkv.weight, model.qkv.bias, model.proj.weight, model.proj.bias,
                       model.num_heads, hw, model.rep_grid, legacy)


# ----------------------------------------------------------------------------------------
# AdaptedCBSA
# ----------------------------------------------------------------------------------------
REF_CASES = [  # (hw, prefix tokens, num_reps, legacy)
    ((4, 6), 0, (2, 3), False),  # no prefix, non-square grid and representatives
    ((5, 3), 2, 4, False),  # two prefix tokens (CLS + register)
    ((3, 5), 1, (3, 2), False),
    ((3, 3), 1, 4, True),  # legacy: first N-1 = 9 tokens as a 3x3 square
]


@pytest.mark.parametrize('hw,prefix,num_reps,legacy', REF_CASES,
                         ids=[f'{h}x{w}-prefix{p}-reps{r}-{"legacy" if lg else "grid"}'
                              for (h, w), p, r, lg in REF_CASES])
def test_matches_hand_written_reference(hw, prefix, num_reps, legacy):
    torch.manual_seed(0)
    model = randomize(build_attn(embed_dims=12, num_heads=3, num_reps=num_reps,
                                 legacy_pooling=legacy)).eval()
    x = torch.randn(2, prefix + hw[0] * hw[1], 12)
    y_ref, contract, broadcast = module_ref(model, x, hw, legacy)
    with torch.no_grad():
        y = model(x, hw_shape=hw)  # SDPA path
    maps = model.attention_maps(x, hw_shape=hw)  # explicit weights
    assert (y - y_ref).abs().max() <= 1e-5
    assert maps['attention'].shape == contract.shape  # (B, H, m, N)
    assert maps['broadcast'].shape == broadcast.shape  # (B, H, N, m)
    assert (maps['attention'] - contract).abs().max() <= 1e-6
    assert (maps['broadcast'] - broadcast).abs().max() <= 1e-6
    # the explicit weights applied to the values give the forward's output
    v = split_heads(x @ model.qkv.weight[24:].t() + model.qkv.bias[24:], 3)
    y_explicit = model.proj(merge_heads(maps['broadcast'] @ (maps['attention'] @ v)))
    assert (y_explicit - y_ref).abs().max() <= 1e-5


def test_gradients_match_reference():
    torch.manual_seed(0)
    model = randomize(build_attn(embed_dims=12, num_heads=3, num_reps=(2, 3)))
    x = torch.randn(2, 2 + 4 * 5, 12, requires_grad=True)
    g = torch.randn(2, 22, 12)
    (model(x, hw_shape=(4, 5)) * g).sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters()]
    x2 = x.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    ps = dict(zip(names, params))
    y_ref = ref_adapted(x2, ps['qkv.weight'], ps['qkv.bias'], ps['proj.weight'],
                        ps['proj.bias'], 3, (4, 5), (2, 3))[0]
    (y_ref * g).sum().backward()
    for name, a, b in zip(['x'] + names, grads, [x2.grad] + [p.grad for p in params]):
        assert (a - b).abs().max() <= 1e-5 * max(1., b.abs().max().item()), name


@pytest.mark.parametrize('legacy', [False, True], ids=['grid', 'legacy'])
def test_gradcheck_float64(legacy):
    torch.manual_seed(0)
    model = randomize(build_attn(embed_dims=4, num_heads=2, num_reps=(1, 2) if not legacy
                                 else 4, legacy_pooling=legacy)).double()
    hw = (2, 3) if not legacy else (3, 3)
    x = torch.randn(1, 1 + hw[0] * hw[1], 4, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())

    def fn(inp, *ps):
        return functional_call(model, dict(zip(names, ps)), (inp, ), dict(hw_shape=hw))

    assert torch.autograd.gradcheck(fn, (x, ) + params, eps=1e-6, atol=1e-6, rtol=1e-5,
                                    fast_mode=True)


def test_bf16_autocast_keeps_float32_statistics():
    torch.manual_seed(0)
    model = build_attn(embed_dims=32, num_heads=4, num_reps=(2, 3))
    x = torch.randn(2, 1 + 6 * 7, 32, requires_grad=True)
    with torch.no_grad():
        y32 = model(x, hw_shape=(6, 7))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = model(x, hw_shape=(6, 7))
        maps = model.attention_maps(x, hw_shape=(6, 7))
    assert (y.float() - y32).abs().max() <= 0.05 * y32.abs().max() + 1e-3
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the explicit weights: softmax rows sum to one (to bf16 precision)
    assert (maps['attention'].float().sum(-1) - 1).abs().max() <= 1e-2
    assert (maps['broadcast'].float().sum(-1) - 1).abs().max() <= 1e-2


@pytest.mark.parametrize('path', fixture_params('adapted_vit'))
def test_official_fixture_parity(path):
    fx = load_fixture(path)
    cfg = fx['config']
    model = build_attn(embed_dims=cfg['dim'], num_heads=cfg['num_heads'],
                       qkv_bias=cfg['qkv_bias'], legacy_pooling=True).eval()
    model.load_state_dict(fx['state_dict'])  # the official names: qkv.*, proj.*
    x = fx['input']
    side = math.isqrt(x.shape[1] - 1)  # [CLS; side x side patches]
    assert side * side == x.shape[1] - 1, f'{path.name}: tokens are not [CLS; square grid]'
    with torch.no_grad():
        y = model(x, hw_shape=(side, side))
    assert y.shape == fx['output'].shape
    err = (y - fx['output']).abs().max().item()
    assert err <= 1e-4, f'{path.name}: max abs err {err}'


def test_argument_errors():
    model = build_attn(embed_dims=16, num_heads=2)
    with pytest.raises(ValueError, match='embed_dims=16'):
        model(torch.randn(1, 5, 12), hw_shape=(2, 2))
    with pytest.raises(ValueError, match='hw_shape'):
        model(torch.randn(1, 5, 16))
    with pytest.raises(ValueError, match='num_reps'):
        build_attn(embed_dims=16, num_heads=2, num_reps=10)
    with pytest.raises(ValueError, match='num_heads'):
        build_attn(embed_dims=16, num_heads=3)
    legacy = build_attn(embed_dims=16, num_heads=2, legacy_pooling=True)
    with pytest.raises(ValueError, match='legacy_pooling'):
        legacy(torch.randn(1, 12, 16))  # N - 1 = 11 is not a square


def test_more_representatives_than_patches_warns_once():
    model = build_attn(embed_dims=8, num_heads=2, num_reps=(7, 7))
    x = torch.randn(1, 1 + 3 * 5, 8)
    with pytest.warns(UserWarning, match=r'49 representatives \(7x7\).*only 15 patch tokens'):
        model(x, hw_shape=(3, 5))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        model(x, hw_shape=(3, 5))  # once per process


@pytest.mark.parametrize('registry', [SEG_MODELS, PRETRAIN_MODELS], ids=['mmseg', 'mmpretrain'])
def test_registered_in_both_registries(registry):
    model = registry.build(dict(type='AdaptedCBSA', embed_dims=48, num_heads=3))
    assert model.rep_grid == (8, 8) and not model.legacy_pooling
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        'qkv.weight': (144, 48), 'qkv.bias': (144, ), 'proj.weight': (48, 48),
        'proj.bias': (48, )}


# ----------------------------------------------------------------------------------------
# AdaptedVisionTransformer (mmpretrain and mmseg)
# ----------------------------------------------------------------------------------------
def pretrain_vit(adapted=True, **kwargs):
    cfg = dict(type='AdaptedVisionTransformer' if adapted else 'VisionTransformer',
               arch=TINY_ARCH, img_size=224, patch_size=16)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return PRETRAIN_MODELS.build(dict(cfg, **kwargs))


def seg_vit(adapted=True, **kwargs):
    cfg = dict(type='AdaptedVisionTransformer' if adapted else 'VisionTransformer',
               img_size=(224, 224), patch_size=16, embed_dims=32, num_layers=2, num_heads=2,
               mlp_ratio=2, final_norm=True)
    with DefaultScope.overwrite_default_scope('mmseg'):
        return SEG_MODELS.build(dict(cfg, **kwargs))


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].shape == sb[key].shape, key
        assert torch.equal(sa[key], sb[key]), key


PRETRAIN_OPTIONS = [
    dict(),
    dict(with_cls_token=False, out_type='featmap'),
    dict(layer_scale_init_value=0.1, out_type='avg_featmap'),
    dict(adapt_layers=[-1], adapt_cfg=dict(num_reps=(3, 4))),
]
SEG_OPTIONS = [dict(), dict(with_cls_token=False), dict(qkv_bias=False, adapt_layers=[0])]


def _ids(options):
    return ['-'.join(f'{k}={v}' for k, v in o.items()) or 'default' for o in options]


@pytest.mark.parametrize('kwargs', PRETRAIN_OPTIONS, ids=_ids(PRETRAIN_OPTIONS))
def test_pretrain_state_dict_and_init_identical(kwargs):
    plain_kwargs = {k: v for k, v in kwargs.items() if not k.startswith('adapt')}
    torch.manual_seed(0)
    adapted = pretrain_vit(**kwargs)
    adapted.init_weights()
    torch.manual_seed(0)
    plain = pretrain_vit(adapted=False, **plain_kwargs)
    plain.init_weights()
    assert_same_state(adapted, plain)


@pytest.mark.parametrize('kwargs', SEG_OPTIONS, ids=_ids(SEG_OPTIONS))
def test_seg_state_dict_and_init_identical(kwargs):
    plain_kwargs = {k: v for k, v in kwargs.items() if not k.startswith('adapt')}
    torch.manual_seed(0)
    adapted = seg_vit(**kwargs)
    adapted.init_weights()
    torch.manual_seed(0)
    plain = seg_vit(adapted=False, **plain_kwargs)
    plain.init_weights()
    assert_same_state(adapted, plain)


def _capture(modules, with_kwargs=False):
    """Forward hooks recording (inputs, output) of each module."""
    records, handles = [], []
    for m in modules:
        if with_kwargs:
            handles.append(m.register_forward_hook(
                lambda mod, args, kw, out: records.append((mod, kw['query'], out[0])),
                with_kwargs=True))
        else:
            handles.append(m.register_forward_hook(
                lambda mod, args, out: records.append((mod, args[0], out))))
    return records, handles


PRETRAIN_FORWARD = [  # (input size, kwargs)
    ((224, 224), dict()),
    ((160, 224), dict(adapt_cfg=dict(num_reps=(3, 5)))),  # 10x14 patches
    ((224, 224), dict(adapt_cfg=dict(legacy_pooling=True))),
    ((96, 144), dict(with_cls_token=False, out_type='featmap',  # no prefix token
                     adapt_cfg=dict(num_reps=(2, 4)))),
]


@pytest.mark.parametrize('size,kwargs', PRETRAIN_FORWARD,
                         ids=[f'{h}x{w}-' + _ids([k])[0] for (h, w), k in PRETRAIN_FORWARD])
def test_pretrain_adapted_layers_compute_reference(size, kwargs):
    torch.manual_seed(0)
    model = pretrain_vit(drop_path_rate=0.1, **kwargs)
    model.init_weights()
    randomize(model, scale=0.2)
    hw = (size[0] // 16, size[1] // 16)
    legacy = kwargs.get('adapt_cfg', {}).get('legacy_pooling', False)
    model.eval()
    records, handles = _capture([layer.attn for layer in model.layers])
    with torch.no_grad():
        model(torch.randn(2, 3, *size))
    for h in handles:
        h.remove()
    assert len(records) == len(model.layers)
    for attn, x, out in records:
        core = attn.scaled_dot_product_attention
        assert x.shape[1] == hw[0] * hw[1] + (0 if 'with_cls_token' in kwargs else 1)
        ref = ref_adapted(x, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias,
                          attn.num_heads, hw, core.rep_grid, legacy)[0]
        assert (out - ref).abs().max() <= 1e-4
    model.train()  # backward at the same size, drop path on
    outs = model(torch.randn(2, 3, *size))
    sum(o.float().square().mean() for o in outs).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


SEG_FORWARD = [
    ((224, 224), dict()),
    ((160, 224), dict(adapt_cfg=dict(num_reps=(3, 5)))),
    ((96, 144), dict(with_cls_token=False, adapt_cfg=dict(num_reps=(4, 2)))),
]


@pytest.mark.parametrize('size,kwargs', SEG_FORWARD,
                         ids=[f'{h}x{w}-' + _ids([k])[0] for (h, w), k in SEG_FORWARD])
def test_seg_adapted_layers_compute_reference(size, kwargs):
    torch.manual_seed(0)
    model = seg_vit(drop_path_rate=0.1, **kwargs)
    model.init_weights()
    randomize(model, scale=0.2)
    hw = (size[0] // 16, size[1] // 16)
    model.eval()
    records, handles = _capture([layer.attn.attn for layer in model.layers], with_kwargs=True)
    with torch.no_grad():
        feats = model(torch.randn(2, 3, *size))
    for h in handles:
        h.remove()
    assert feats[-1].shape == (2, 32, *hw)
    assert len(records) == len(model.layers)
    for inner, query, out in records:  # query / out: (N, B, C), as torch's MHA
        x = query.transpose(0, 1)
        assert x.shape[1] == hw[0] * hw[1] + (0 if 'with_cls_token' in kwargs else 1)
        ref = ref_adapted(x, inner.in_proj_weight, inner.in_proj_bias, inner.out_proj.weight,
                          inner.out_proj.bias, inner.num_heads, hw, inner.rep_grid)[0]
        assert (out.transpose(0, 1) - ref).abs().max() <= 1e-4
    model.train()
    model(torch.randn(2, 3, *size))[-1].square().mean().backward()
    for name, p in model.named_parameters():
        if 'cls_token' in name and 'with_cls_token' in kwargs:
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_adapt_layers_selects_layers():
    torch.manual_seed(0)
    model = pretrain_vit(arch=dict(TINY_ARCH, num_layers=3), adapt_layers=[-1, 0])
    assert model.adapted_layers == [0, 2]
    cores = [type(layer.attn.scaled_dot_product_attention).__name__ == 'AdaptedSDPA'
             for layer in model.layers]
    assert cores == [True, False, True]
    seg = seg_vit(num_layers=3, adapt_layers=1)
    assert [type(layer.attn.attn).__name__ for layer in seg.layers] == [
        'MultiheadAttention', 'AdaptedInProjAttention', 'MultiheadAttention']
    # no adapted layer: the plain backbone, exactly
    torch.manual_seed(0)
    none = pretrain_vit(adapt_layers=[])
    torch.manual_seed(0)
    plain = pretrain_vit(adapted=False)
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        assert torch.equal(none(x)[0], plain(x)[0])


@pytest.mark.parametrize('build', [pretrain_vit, seg_vit], ids=['mmpretrain', 'mmseg'])
def test_bad_adapt_arguments(build):
    with pytest.raises(ValueError, match=r'adapt_layers index 2 is out of range for 2 layers'):
        build(adapt_layers=[0, 2])
    with pytest.raises(ValueError, match=r'adapt_layers index -3'):
        build(adapt_layers=-3)
    with pytest.raises(ValueError, match='adapt_layers'):
        build(adapt_layers=['last'])
    with pytest.raises(ValueError, match='adapt_cfg has unknown keys'):
        build(adapt_cfg=dict(num_rep=16))
    with pytest.raises(ValueError, match='num_reps'):
        build(adapt_cfg=dict(num_reps=12))
    no_cls = dict(with_cls_token=False, out_type='featmap') if build is pretrain_vit \
        else dict(with_cls_token=False)
    with pytest.raises(ValueError, match='legacy_pooling'):
        build(adapt_cfg=dict(legacy_pooling=True), **no_cls)


def test_attention_maps_through_the_backbone():
    """The mmseg core's maps for the arguments of its call, on the backbone's grid."""
    model = seg_vit(adapt_cfg=dict(num_reps=(2, 3)))
    model.eval()  # mmseg's ViT.train() returns None: no chaining
    core = model.layers[1].attn.attn
    seen = {}
    core.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(args=args, kwargs=kwargs), with_kwargs=True)
    with torch.no_grad():
        model(torch.randn(1, 3, 96, 128))
    maps = core.attention_maps(*seen['args'], **seen['kwargs'])
    assert maps['attention'].shape == (1, 2, 6, 1 + 6 * 8)  # grid 6x8 from the backbone
    assert maps['broadcast'].shape == (1, 2, 1 + 6 * 8, 6)


@pytest.mark.parametrize('build', [pretrain_vit, seg_vit], ids=['mmpretrain', 'mmseg'])
def test_deepcopy_reads_its_own_patch_grid(build):
    """EMA hooks and model wrappers deep-copy models: the copy's layers must follow the
    copy's input, not the original's."""
    model = build(adapt_cfg=dict(num_reps=4))
    twin = copy.deepcopy(model)
    model(torch.randn(1, 3, 64, 64))
    twin(torch.randn(1, 3, 96, 128))
    assert model._patch_grid.hw == (4, 4) and twin._patch_grid.hw == (6, 8)
    layer = twin.layers[0].attn
    core = layer.attn if build is seg_vit else layer.scaled_dot_product_attention
    assert core._patch_grid is twin._patch_grid


# ----------------------------------------------------------------------------------------
# checkpoints: every tensor arrives unchanged; what does not load is reported
# ----------------------------------------------------------------------------------------
def classifier_cfg(backbone_type='VisionTransformer', **backbone):
    return dict(type='ImageClassifier',
                backbone=dict(type=backbone_type, arch=TINY_ARCH, img_size=224, patch_size=16,
                              **backbone),
                neck=None,
                head=dict(type='VisionTransformerClsHead', num_classes=5, in_channels=32))


def save_checkpoint(path, state_dict):
    torch.save({'state_dict': state_dict, 'meta': dict(note='test')}, path)


def assert_loaded(model, state_dict, prefix=''):
    current = model.state_dict()
    for key, value in state_dict.items():
        assert torch.equal(current[prefix + key], value), key


def run_load_from(tmp_path, model, checkpoint, scope):
    runner = Runner(model=model, work_dir=str(tmp_path / 'work'), load_from=str(checkpoint),
                    default_scope=scope, experiment_name=f'load-{uuid.uuid4().hex[:8]}')
    runner.load_or_resume()
    return runner


@pytest.fixture(scope='module')
def pretrain_checkpoint(tmp_path_factory):
    """A random tiny mmpretrain ViT classifier saved mmengine-style."""
    torch.manual_seed(1)
    with DefaultScope.overwrite_default_scope('mmpretrain'):  # module scope: leave no trace
        plain = randomize(PRETRAIN_MODELS.build(classifier_cfg()), seed=1, scale=0.1)
    path = tmp_path_factory.mktemp('ckpt') / 'vit_tiny.pth'
    save_checkpoint(path, plain.state_dict())
    return path, {k: v.clone() for k, v in plain.state_dict().items()}


def test_pretrain_checkpoint_loads_unchanged(pretrain_checkpoint, tmp_path):
    path, state = pretrain_checkpoint
    init_default_scope('mmpretrain')
    # (1) backbone init_cfg with prefix, from an mmpretrain classifier checkpoint
    cfg = classifier_cfg('AdaptedVisionTransformer', init_cfg=dict(
        type='Pretrained', checkpoint=str(path), prefix='backbone.'))
    model = PRETRAIN_MODELS.build(cfg)
    model.init_weights()
    assert_loaded(model.backbone, {k[9:]: v for k, v in state.items()
                                   if k.startswith('backbone.')})
    # (2) whole-model init_cfg (how configs/vit_adapt start)
    model = PRETRAIN_MODELS.build(dict(classifier_cfg('AdaptedVisionTransformer'),
                                       init_cfg=dict(type='Pretrained', checkpoint=str(path))))
    model.init_weights()
    assert_loaded(model, state)
    # (3) load_from through mmengine's Runner
    model = PRETRAIN_MODELS.build(classifier_cfg('AdaptedVisionTransformer'))
    run_load_from(tmp_path, model, path, 'mmpretrain')
    assert_loaded(model, state)
    model.train()  # the loaded adapted classifier trains at 224 and non-square
    for size in ((224, 224), (160, 224)):
        data = dict(inputs=torch.randn(2, 3, *size),
                    data_samples=[DataSample().set_gt_label(i) for i in (1, 3)])
        loss = model(**data, mode='loss')['loss']
        assert torch.isfinite(loss)
        loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters())


def test_pretrain_checkpoint_of_another_resolution(pretrain_checkpoint):
    """How the 224-px ViT-B/L configs start from 384-px checkpoints (and the 384-px T/S
    configs from 224-px ones): mmpretrain's load hook resizes the position embedding;
    every other tensor arrives unchanged."""
    path, state = pretrain_checkpoint  # built for 224 px: 14 x 14 patches
    cfg = classifier_cfg('AdaptedVisionTransformer')
    cfg['backbone']['img_size'] = 160  # 10 x 10
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = PRETRAIN_MODELS.build(dict(cfg, init_cfg=dict(type='Pretrained',
                                                              checkpoint=str(path))))
    model.init_weights()
    assert model.backbone.pos_embed.shape == (1, 1 + 10 * 10, 32)
    assert torch.equal(model.backbone.pos_embed[0, 0], state['backbone.pos_embed'][0, 0])
    assert_loaded(model, {k: v for k, v in state.items() if k != 'backbone.pos_embed'})


def test_seg_checkpoint_loads_unchanged(tmp_path):
    torch.manual_seed(2)
    plain = randomize(seg_vit(adapted=False), seed=2, scale=0.1)
    path = tmp_path / 'seg_vit.pth'  # backbone-only keys, as mmseg's pretrain checkpoints
    save_checkpoint(path, plain.state_dict())
    model = seg_vit(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    assert_loaded(model, plain.state_dict())
    # load_from: a whole segmentor checkpoint into its adapted form
    head = dict(type='FCNHead', in_channels=32, channels=8, num_convs=1, num_classes=3,
                concat_input=False)
    seg_plain = randomize(SEG_MODELS.build(dict(type='EncoderDecoder', backbone=dict(
        type='VisionTransformer', img_size=(224, 224), patch_size=16, embed_dims=32,
        num_layers=2, num_heads=2, mlp_ratio=2), decode_head=head)), seed=3, scale=0.1)
    seg_path = tmp_path / 'segmentor.pth'
    save_checkpoint(seg_path, seg_plain.state_dict())
    seg = SEG_MODELS.build(dict(type='EncoderDecoder', backbone=dict(
        type='AdaptedVisionTransformer', img_size=(224, 224), patch_size=16, embed_dims=32,
        num_layers=2, num_heads=2, mlp_ratio=2), decode_head=head))
    run_load_from(tmp_path, seg, seg_path, 'mmseg')
    assert_loaded(seg, seg_plain.state_dict())


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_keys_that_do_not_load_are_reported(pretrain_checkpoint, tmp_path, capsys):
    _, state = pretrain_checkpoint
    broken = dict(state)
    broken['backbone.extra_tensor'] = torch.zeros(3)  # unexpected
    missing = broken.pop('backbone.layers.0.attn.qkv.bias')  # missing
    path = tmp_path / 'broken.pth'
    save_checkpoint(path, broken)
    init_default_scope('mmpretrain')
    # init_cfg=Pretrained: mmengine logs a warning through the current MMLogger
    logger = MMLogger.get_current_instance()
    handler = _ListHandler()
    logger.addHandler(handler)
    try:
        model = PRETRAIN_MODELS.build(dict(classifier_cfg('AdaptedVisionTransformer'),
                                           init_cfg=dict(type='Pretrained', checkpoint=str(path))))
        model.init_weights()
    finally:
        logger.removeHandler(handler)
    report = '\n'.join(handler.messages)
    assert 'unexpected key in source state_dict: backbone.extra_tensor' in report
    assert 'missing keys in source state_dict: backbone.layers.0.attn.qkv.bias' in report
    assert not torch.equal(model.backbone.layers[0].attn.qkv.bias, missing)
    # load_from: mmengine prints the same report
    capsys.readouterr()
    run_load_from(tmp_path, PRETRAIN_MODELS.build(classifier_cfg('AdaptedVisionTransformer')),
                  path, 'mmpretrain')
    out = capsys.readouterr().out
    assert 'unexpected key in source state_dict: backbone.extra_tensor' in out
    assert 'missing keys in source state_dict: backbone.layers.0.attn.qkv.bias' in out
    # mmseg's ViT loads its Pretrained init_cfg itself and prints the report
    seg_state = seg_vit(adapted=False).state_dict()
    seg_state['extra_tensor'] = torch.zeros(3)
    seg_state.pop('layers.1.attn.attn.in_proj_bias')
    seg_path = tmp_path / 'seg_broken.pth'
    save_checkpoint(seg_path, seg_state)
    seg_vit(init_cfg=dict(type='Pretrained', checkpoint=str(seg_path))).init_weights()
    out = capsys.readouterr().out
    assert 'unexpected key in source state_dict: extra_tensor' in out
    assert 'missing keys in source state_dict: layers.1.attn.attn.in_proj_bias' in out


# ----------------------------------------------------------------------------------------
# configs/vit_adapt
# ----------------------------------------------------------------------------------------
def readme_example():
    text = (ADAPT_DIR / 'README.md').read_text()
    match = re.search(r'<!-- example-config -->\s*```python\n(.*?)```', text, re.S)
    assert match, 'configs/vit_adapt/README.md lost its example config'
    return match.group(1)


def test_readme_example_adapts_an_mmpretrain_checkpoint(pretrain_checkpoint, tmp_path):
    """The README's short config, inheriting mmpretrain's own ViT config, adapts a
    checkpoint (here a tiny one in place of the model-zoo URL): every tensor unchanged."""
    path, state = pretrain_checkpoint
    code = readme_example()
    lines = [ln for ln in code.splitlines() if ln.strip()]
    assert len(lines) < 15 and lines[0].startswith("_base_ = 'mmpretrain::")
    cfg_file = tmp_path / 'example.py'
    cfg_file.write_text(code)
    cfg = Config.fromfile(str(cfg_file))
    assert cfg.model.backbone.type == 'AdaptedVisionTransformer'
    assert cfg.model.init_cfg.type == 'Pretrained'
    cfg.model.backbone.update(arch=TINY_ARCH, img_size=224)
    cfg.model.head.update(num_classes=5, in_channels=32, hidden_dim=None)
    cfg.model.init_cfg.checkpoint = str(path)
    init_default_scope(cfg.default_scope)
    model = PRETRAIN_MODELS.build(cfg.model)
    model.init_weights()
    assert_loaded(model, state)


def test_vit_adapt_config_train_step():
    """One optimisation step of a configs/vit_adapt config (tiny arch, no download)."""
    cfg = Config.fromfile(str(ADAPT_DIR / 'vit-tiny-p16_cbsa-adapt_8xb64-50e_in1k.py'))
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=5e-5, betas=(0.9, 0.999),
                                               weight_decay=0.01)
    assert cfg.train_cfg.max_epochs == 50 and cfg.auto_scale_lr.base_batch_size == 512
    assert cfg.train_dataloader.batch_size == 64
    init_default_scope(cfg.default_scope)
    model_cfg = cfg.model
    model_cfg.backbone.update(arch=TINY_ARCH, img_size=32, patch_size=8,
                              adapt_cfg=dict(num_reps=(2, 2)))
    model_cfg.head.update(num_classes=4, in_channels=32)
    model_cfg.pop('init_cfg')  # the real one downloads DeiT-T
    model_cfg.setdefault('data_preprocessor', dict(cfg.data_preprocessor, num_classes=4))
    torch.manual_seed(0)
    model = PRETRAIN_MODELS.build(model_cfg)
    model.init_weights()
    assert model.backbone.adapted_layers == [0, 1]
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = dict(inputs=[torch.randint(0, 256, (3, 32, 40), dtype=torch.uint8)
                        for _ in range(2)],
                data_samples=[DataSample().set_gt_label(i) for i in (0, 3)])
    model.train()
    losses = model.train_step(data, optim_wrapper)
    assert torch.isfinite(losses['loss'])
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any('attn.qkv' in n for n in changed) and any('head' in n for n in changed)


def test_ade20k_config_changes_only_the_encoder_type():
    adapted = Config.fromfile(
        str(ADAPT_DIR / 'depict-sa_vit-s-cbsa-adapt_mask_8xb1-160k_ade20k-512x512.py'))
    parent = Config.fromfile(
        str(REPO / 'configs/depict/depict-sa_vit-s_mask_8xb1-160k_ade20k-512x512.py'))
    assert adapted.model.backbone.pop('type') == 'AdaptedVisionTransformer'
    assert parent.model.backbone.pop('type') == 'VisionTransformer'
    assert adapted.to_dict() == parent.to_dict()
    assert adapted.model.pretrained.endswith('vit_small_p16_384_20220308-410f6037.pth')


# ----------------------------------------------------------------------------------------
# GPU (skipped with a reason without CUDA; `pytest -m cuda` on a GPU machine)
# ----------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    model = randomize(build_attn(embed_dims=64, num_heads=4, num_reps=(4, 4)), scale=0.2)
    x = torch.randn(2, 1 + 12 * 16, 64)
    with torch.no_grad():
        y_cpu = model(x, hw_shape=(12, 16))
    model.cuda()
    xc = x.cuda().requires_grad_()
    y = model(xc, hw_shape=(12, 16))
    assert (y.detach().cpu() - y_cpu).abs().max() <= 1e-3 * y_cpu.abs().max() + 1e-5
    with torch.autocast('cuda', dtype=torch.bfloat16):
        y16 = model(xc, hw_shape=(12, 16))
    assert (y16.float().detach().cpu() - y_cpu).abs().max() <= 0.05 * y_cpu.abs().max() + 1e-3
    y16.float().sum().backward()
    assert torch.isfinite(xc.grad).all()
    # an adapted mmpretrain backbone, non-square input, forward and backward on the GPU
    torch.manual_seed(0)
    vit = pretrain_vit(adapt_cfg=dict(num_reps=(3, 5)))
    vit.init_weights()
    img = torch.randn(2, 3, 160, 224)
    vit.eval()
    with torch.no_grad():
        ref = vit(img)[0]
    vit.cuda()
    out = vit(img.cuda())[0]
    assert (out.detach().cpu() - ref).abs().max() <= 1e-3 * ref.abs().max() + 1e-5
    out.square().mean().backward()
    for name, p in vit.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
