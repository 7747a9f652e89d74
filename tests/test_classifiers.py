"""mmpretrain classifiers: Primal reference parity (logits and KSVD loss), the KSVD
classifier's loss dict, training through tools/train.py on the mini ImageNet, and
parameter / FLOP counts against docs/mechanisms.md §1."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import fixture_params, load_fixture
from reference_configs import primal_classifier
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope
from mmpretrain.structures import DataSample

import mmcbsa  # noqa: F401
from mmcbsa.analysis import model_complexity
from mmcbsa.converters import convert_primal_block_attention, convert_timm_vit
from mmcbsa.models.attentions.primal import PrimalAttention, collect_ksvd_loss

REPO = Path(__file__).resolve().parents[1]


def _build(cfg):
    from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(cfg)


# ---------------------------------------------------------------------------------
# parity with the reference Primal models (docs/mechanisms.md §6, §7)
# ---------------------------------------------------------------------------------
def _convert(state_dict):
    return convert_timm_vit(state_dict, convert_primal_block_attention)


@pytest.mark.parametrize('path', fixture_params('primal'))
def test_primal_reference_parity(path):
    fx = load_fixture(path)
    model = _build(primal_classifier(fx['config']))
    model.load_state_dict(_convert(fx['state_dict']), strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(fx['input'], mode='tensor')
        ksvd = collect_ksvd_loss(model.backbone)
    err = (logits - fx['output']).abs().max().item()
    assert err <= 1e-4, f'{path.stem}: logits max abs err {err:.3e}'
    assert abs(ksvd.item() - fx['ksvd_loss'].item()) <= 1e-4, path.stem
    # which blocks are Primal follows the reference config
    kinds = [type(layer.attn).__name__ for layer in model.backbone.layers]
    n_primal = (fx['config']['depth'] if isinstance(fx['config']['low_rank'], list)
                else fx['config']['num_ksvd_layer'])
    assert kinds.count('PrimalAttention') == n_primal
    assert all(k == 'PrimalAttention' for k in kinds[len(kinds) - n_primal:])


def test_primal_converter_rejects_unknown_and_missing_keys():
    fx = load_fixture(fixture_params('primal_deit')[0].values[0])
    sd = dict(fx['state_dict'], **{'blocks.0.attn.extra': torch.zeros(1)})
    with pytest.raises(KeyError, match='blocks.0.attn.extra'):
        _convert(sd)
    sd = dict(fx['state_dict'], extra_param=torch.zeros(1))
    with pytest.raises(KeyError, match=r"unconverted reference keys \['extra_param'\]"):
        _convert(sd)
    sd = dict(fx['state_dict'])
    sd.pop('head.bias')
    with pytest.raises(KeyError, match="missing reference key 'head.bias'"):
        _convert(sd)


# ---------------------------------------------------------------------------------
# KSVDImageClassifier: loss = task loss + η · KSVD loss
# ---------------------------------------------------------------------------------
def _small_classifier(arch: str, num_classes: int = 5, ksvd_weight: float = 0.05,
                      label_smooth: float = 0.1):
    small_attn = dict(low_rank=3, rank_multi=2)
    backbone_arch = dict(base=arch, embed_dims=32, num_layers=3, num_heads=2)
    if arch.startswith('cbt'):
        backbone_arch['attn_cfg'] = dict(head_dims=16, num_reps=4)
    elif arch == 'primal-deit-small':
        backbone_arch['tail_attn_cfg'] = dict(type='PrimalAttention', **small_attn)
    return _build(dict(
        type='KSVDImageClassifier', ksvd_weight=ksvd_weight,
        backbone=dict(type='WhiteBoxViT', arch=backbone_arch, img_size=64, patch_size=16),
        head=dict(type='LinearClsHead', num_classes=num_classes, in_channels=32,
                  loss=dict(type='LabelSmoothLoss', label_smooth_val=label_smooth,
                            mode='original'))))


def _samples(labels):
    return [DataSample().set_gt_label(int(y)) for y in labels]


def _label_smooth_ce(logits, labels, eps, num_classes):
    # 'original' label smoothing: targets (1 − ε) one-hot + ε / K
    target = F.one_hot(labels, num_classes).float() * (1 - eps) + eps / num_classes
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def test_ksvd_loss_added_when_primal_layers_present():
    torch.manual_seed(0)
    model = _small_classifier('primal-deit-small')
    assert model.has_ksvd_layers
    img, labels = torch.randn(3, 3, 64, 80), torch.tensor([0, 4, 2])
    losses = model.loss(img, _samples(labels))
    assert set(losses) == {'loss', 'loss_ksvd'}
    layers = [m for m in model.backbone.modules() if isinstance(m, PrimalAttention)]
    assert len(layers) == 1 and layers[0] is model.backbone.layers[-1].attn
    torch.testing.assert_close(losses['loss_ksvd'], 0.05 * layers[0].ksvd_loss)
    with torch.no_grad():
        logits = model(img, mode='tensor')
    torch.testing.assert_close(losses['loss'], _label_smooth_ce(logits, labels, 0.1, 5))
    # the regulariser reaches Λ (used only by the KSVD loss) through the summed loss dict
    sum(losses.values()).backward()
    assert layers[0].lambdas.grad is not None and layers[0].lambdas.grad.abs().sum() > 0


def test_primalformer_ksvd_is_mean_over_layers():
    torch.manual_seed(1)
    model = _build(dict(
        type='KSVDImageClassifier', ksvd_weight=0.5,
        backbone=dict(type='WhiteBoxViT', img_size=48, patch_size=16,
                      arch=dict(base='primalformer-small', embed_dims=32, num_layers=2,
                                num_heads=2, attn_cfg=dict(low_rank=2, rank_multi=2))),
        head=dict(type='LinearClsHead', num_classes=3, in_channels=32)))
    losses = model.loss(torch.randn(2, 3, 48, 48), _samples([0, 2]))
    per_layer = [layer.attn.ksvd_loss for layer in model.backbone.layers]
    torch.testing.assert_close(losses['loss_ksvd'], 0.5 * (per_layer[0] + per_layer[1]) / 2)


def test_no_ksvd_loss_without_primal_layers():
    model = _small_classifier('cbt-tiny')
    assert not model.has_ksvd_layers
    losses = model.loss(torch.randn(2, 3, 64, 64), _samples([1, 3]))
    assert set(losses) == {'loss'}


def test_ksvd_classifier_train_step_updates_lambdas():
    torch.manual_seed(0)
    model = _small_classifier('primal-deit-small')
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        wrapper = build_optim_wrapper(model, dict(optimizer=dict(type='Lion', lr=1e-3)))
    lam = model.backbone.layers[-1].attn.lambdas
    before = lam.detach().clone()
    data = dict(inputs=[torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)] * 2,
                data_samples=_samples([0, 1]))
    log = model.train_step(data, wrapper)
    assert set(log) >= {'loss', 'loss_ksvd'}
    assert not torch.equal(before, lam.detach())


def test_ksvd_weight_must_be_non_negative():
    with pytest.raises(ValueError, match='ksvd_weight'):
        _small_classifier('primal-deit-small', ksvd_weight=-1.0)


# ---------------------------------------------------------------------------------
# a few training iterations of the tiny CBT config through tools/train.py
# ---------------------------------------------------------------------------------
def test_train_cbt_nano_on_mini_imagenet(tmp_path):
    data, work = tmp_path / 'mini_imagenet', tmp_path / 'work'
    subprocess.run([sys.executable, str(REPO / 'tools/misc/make_mini_dataset.py'),
                    '--dataset', 'imagenet', '--out', str(data), '--num-classes', '4',
                    '--num-train', '6', '--num-val', '2'], check=True, cwd=REPO)
    cfg = REPO / 'configs/cbt/cbt-nano-p8_1xb8-lion-2e_mini-in1k-64px.py'
    root = f'={data}'
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools/train.py'), str(cfg), '--work-dir', str(work),
         '--cfg-options', 'train_dataloader.dataset.data_root' + root,
         'val_dataloader.dataset.data_root' + root, 'test_dataloader.dataset.data_root' + root,
         'train_dataloader.num_workers=0', 'val_dataloader.num_workers=0',
         'test_dataloader.num_workers=0'],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (work / 'epoch_2.pth').exists()
    logs = sorted(work.glob('*/vis_data/scalars.json'))
    assert logs, 'no scalars log written'
    text = logs[-1].read_text()
    assert '"loss"' in text and 'accuracy/top1' in text
    ckpt = torch.load(work / 'epoch_2.pth', map_location='cpu', weights_only=True)
    assert 'backbone.layers.1.attn.in_proj.weight' in ckpt['state_dict']


# ---------------------------------------------------------------------------------
# params / FLOPs (docs/mechanisms.md §1 table) through mmengine's analysis
# ---------------------------------------------------------------------------------
def _cbt_macs(d: int, depth: int, heads: int, p: int = 64, m: int = 64, img: int = 224,
              classes: int = 1000) -> int:
    """Multiply-adds of a CBT classifier, written from docs/mechanisms.md §1 (mmengine's counting:
    convs/linears/matmuls as MACs, LayerNorm 5/element, eval BatchNorm 2/element,
    adaptive pooling 1/input element)."""
    chans = [3, d // 8, d // 4, d // 2, d]
    total, side = 0, img
    for i in range(4):  # conv stem
        side //= 2
        total += side * side * chans[i + 1] * chans[i] * 9 + 2 * side * side * chans[i + 1]
    grid = side * side
    n, hp = grid + 1, heads * p
    per_layer = (2 * 5 * n * d  # two LayerNorms
                 + n * d * hp + hp * grid  # w = x Uᵀ, pooling of the patch tokens
                 + 3 * heads * m * p * n + 2 * heads * m * m * p  # extract, contract, broadcast
                 + n * hp * d  # output projection
                 + 2 * n * d * d)  # ISTA: v = u − u Dᵀ, then v D
    return total + depth * per_layer + 5 * n * d + d * classes


@pytest.mark.parametrize('arch, d, depth, heads, params_m, flops_g', [
    ('cbt-tiny', 192, 12, 3, 1.8, 1.1),
    ('cbt-small', 384, 12, 6, 6.7, 4.0),
])
def test_cbt_complexity(arch, d, depth, heads, params_m, flops_g):
    model = _build(dict(type='ImageClassifier',
                        backbone=dict(type='WhiteBoxViT', arch=arch),
                        head=dict(type='LinearClsHead', num_classes=1000, in_channels=d)))
    result = model_complexity(model, (3, 224, 224))
    # parameters: the paper's table (docs/mechanisms.md §1) within 3 %
    assert abs(result['params'] / 1e6 - params_m) <= 0.03 * params_m, result['params']
    # FLOPs: the counter sees every matmul of CBSA/ISTA (hand count from docs/mechanisms.md §1)
    expected = _cbt_macs(d, depth, heads)
    assert math.isclose(result['flops'], expected, rel_tol=1e-3), (result['flops'], expected)
    # The paper reports FLOPs as 2 × multiply-adds (docs/mechanisms.md §1 table): within ±10 %.
    paper_convention = 2 * result['flops']
    assert abs(paper_convention / 1e9 - flops_g) <= 0.10 * flops_g, paper_convention


def test_sdpa_is_counted():
    """MSSA runs on SDPA, which mmengine's FlopAnalyzer does not count by itself: the
    added handle contributes exactly q kᵀ and A v (2·N²·H·p per layer)."""
    from mmengine.analysis import FlopAnalyzer
    model = _build(dict(type='ImageClassifier',
                        backbone=dict(type='WhiteBoxViT',
                                      arch=dict(base='crate-tiny', num_layers=2)),
                        head=dict(type='LinearClsHead', num_classes=10, in_channels=192)))
    with_handle = model_complexity(model, (3, 224, 224))['flops']
    plain = FlopAnalyzer(model.backbone.eval(), (torch.randn(1, 3, 224, 224), ))
    plain.unsupported_ops_warnings(False)
    plain_total = plain.total()
    assert plain.unsupported_ops().get('aten::scaled_dot_product_attention') == 2
    n, hp = 197, 3 * 64
    head = 192 * 10
    assert with_handle - head - plain_total == 2 * (2 * n * n * hp)
