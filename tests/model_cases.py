"""The attentions and model families that the compile, mixed-precision and CUDA tests
(test_compile.py, test_amp.py, test_cuda.py) run through, as two tables, plus the
error measure they share.

Adding a mechanism is one line in :data:`ATTENTIONS`; adding a model family is one
line in :data:`FAMILIES`. Not a test module (no ``test_`` prefix); importable as
``from model_cases import ...`` because tests/conftest.py puts tests/ on ``sys.path``.
"""
import copy
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import init_default_scope

import mmcbsa  # noqa: F401  (registers the modules)

REPO = Path(__file__).resolve().parents[1]

EMBED_DIMS, NUM_HEADS = 32, 2


@dataclass(frozen=True)
class AttentionCase:
    """One attention configuration.

    Attributes:
        id: test id.
        cfg: registry config without ``embed_dims`` / ``num_heads``
            (:data:`EMBED_DIMS`, :data:`NUM_HEADS` are added).
        hw: patch grid ``(h, w)``; the input is ``(2, prefix + h*w, EMBED_DIMS)``.
        prefix: prefix (CLS) tokens before the patches.
        graph_breaks: the dynamo graph-break reasons the module is known to have
            (substrings of the reasons, listed with their cause in
            docs/compile_and_amp.md); empty: it must compile to one graph
            (``fullgraph=True``).
    """
    id: str
    cfg: dict
    hw: Tuple[int, int] = (4, 4)
    prefix: int = 1
    graph_breaks: Tuple[str, ...] = ()

    def build(self, device='cpu') -> nn.Module:
        from mmseg.registry import MODELS
        return MODELS.build(dict(embed_dims=EMBED_DIMS, num_heads=NUM_HEADS,
                                 **copy.deepcopy(self.cfg))).to(device)

    def input(self, device='cpu', batch: int = 2) -> torch.Tensor:
        n = self.prefix + self.hw[0] * self.hw[1]
        return torch.randn(batch, n, EMBED_DIMS, generator=torch.Generator().manual_seed(1)
                           ).to(device)


ATTENTIONS = [
    AttentionCase('CBSA', dict(type='CBSA', num_reps=4)),
    AttentionCase('MSSA', dict(type='MSSA')),
    AttentionCase('TSSA', dict(type='TSSA')),
    AttentionCase('MHSA', dict(type='MHSA')),
    # 16×16 patches + CLS = 257 tokens, n = min(197, 20·10) = 197 sampled positions: the
    # size at which inductor's integer linspace picked a different position (issue 11)
    AttentionCase('PrimalAttention', dict(type='PrimalAttention'), hw=(16, 16)),
    # 17 tokens: the automatic choice is MiTA's dense path (no data-dependent shapes)
    AttentionCase('MiTA', dict(type='MiTA', num_landmarks=4, topk=4)),
    AttentionCase('MiTA-dwc-gate', dict(type='MiTA', num_landmarks=4, topk=4, dwc=True,
                                        gate=True)),
    AttentionCase('MiTA-routed', dict(type='MiTA', num_landmarks=4, topk=8, mode='routed')),
    # the grouped path (large N): a fixed number of expert blocks, one graph
    AttentionCase('MiTA-grouped', dict(type='MiTA', num_landmarks=4, topk=4, path='grouped')),
    AttentionCase('AdaptedCBSA', dict(type='AdaptedCBSA', num_reps=4)),
    AttentionCase('CBSA-learned', dict(type='CBSA', num_reps=4, rep_mode='learned')),
    # one attention call over a masked key table: the automatic choice on CUDA
    AttentionCase('MiTA-masked', dict(type='MiTA', num_landmarks=4, topk=4, path='masked')),
]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual − expected| / max|expected|`` (float64; ``expected == 0``
    everywhere: the absolute error)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f'shape {tuple(a.shape)} != {tuple(e.shape)}'
    scale = e.abs().max().item()
    return (a - e).abs().max().item() / (scale if scale > 0 else 1.0)


def run_attention(module: nn.Module, x: torch.Tensor, hw: Tuple[int, int],
                  grad_out: torch.Tensor, dtype: Optional[torch.dtype] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, Optional[torch.Tensor]]]:
    """Forward ``module(x, hw_shape=hw)`` (under autocast to ``dtype`` if given) and
    backward of ``Σ y ⊙ grad_out``. Returns ``y``, ``∂/∂x`` and the parameter
    gradients by name (``None`` for parameters the output does not use)."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype or torch.float32,
                        enabled=dtype is not None):
        y = module(x, hw_shape=hw)
    (y.float() * grad_out).sum().backward()
    base = getattr(module, '_orig_mod', module)  # torch.compile's OptimizedModule
    grads = {n: None if p.grad is None else p.grad.detach().clone()
             for n, p in base.named_parameters()}
    return y.detach(), x.grad.detach(), grads


def compare_runs(actual, expected, tol: float, what: str = '') -> Dict[str, float]:
    """Compare two :func:`run_attention` / :func:`run_model` results: every tensor
    within ``tol`` (:func:`rel_err`). A parameter without a gradient in ``expected``
    (unused by the objective) must have none or an all-zero one in ``actual``
    (compiled backward graphs return zeros for such inputs). Returns the errors by name."""
    y, gx, gp = actual
    y0, gx0, gp0 = expected
    errs = {'output': rel_err(y, y0)}
    if gx0 is not None:
        errs['grad input'] = rel_err(gx, gx0)
    assert gp.keys() == gp0.keys(), f'{what}: parameters differ'
    for name in gp0:
        if gp0[name] is None:
            assert gp[name] is None or not gp[name].any(), f'{what}: gradient of {name}'
            continue
        assert gp[name] is not None, f'{what}: no gradient of {name}'
        errs[f'grad {name}'] = rel_err(gp[name], gp0[name])
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f'{what}: relative errors above {tol}: {bad}'
    return errs


def run_model(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
              images: torch.Tensor, grad_out: Optional[torch.Tensor] = None):
    """``y = forward(images)`` (e.g. ``model(images, mode='tensor')``, compiled or not)
    and the parameter gradients of ``Σ y ⊙ grad_out`` plus, for models with
    Primal-Attention layers, their KSVD loss. Returns ``(y, None, grads by name)``
    (the :func:`compare_runs` layout) and ``grad_out`` (random when not given)."""
    from mmcbsa.models.attentions.primal import PrimalAttention, collect_ksvd_loss
    model.zero_grad(set_to_none=True)
    y = forward(images)
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    objective = (y * grad_out).sum()
    if any(isinstance(m, PrimalAttention) for m in model.modules()):
        objective = objective + collect_ksvd_loss(model)
    objective.backward()
    grads = {n: None if p.grad is None else p.grad.detach().clone()
             for n, p in model.named_parameters()}
    return (y.detach(), None, grads), grad_out


# ------------------------------------------------------------------------------- families
def _build(scope: str, cfg: dict) -> nn.Module:
    init_default_scope(scope)
    if scope == 'mmseg':
        from mmseg.registry import MODELS
    else:
        from mmpretrain.registry import MODELS
    return MODELS.build(cfg)


def _from_config(name: str, **model_updates) -> Tuple[str, dict]:
    """The ``model`` of a config under configs/ with ``model.<key>`` updates."""
    cfg = Config.fromfile(str(REPO / 'configs' / name))
    model = cfg.model.to_dict()
    for key, value in model_updates.items():  # set (not merged: a dict may replace a str)
        *parents, last = key.split('.')
        node = model
        for part in parents:
            node = node[part]
        node[last] = copy.deepcopy(value)
    return cfg.default_scope, model


def cbt_classifier() -> nn.Module:
    """The CBT classifier of configs/cbt/cbt-nano-p8_1xb8-lion-2e_mini-in1k-64px.py
    (conv stem, CBSA + ISTA, width 64, 4×4 representatives) with 1 block, 10 classes."""
    scope, cfg = _from_config('cbt/cbt-nano-p8_1xb8-lion-2e_mini-in1k-64px.py',
                              **{'backbone.arch.num_layers': 1, 'head.num_classes': 10,
                                 'head.topk': (1, )})
    return _build(scope, cfg)


def _tiny_vit_segmentor(decode_head: dict) -> nn.Module:
    init_default_scope('mmseg')
    from seg_helpers import tiny_vit_segmentor
    return tiny_vit_segmentor(decode_head)


def depict_segmentor() -> nn.Module:
    """DEPICT-SA head (1 tied-MSSA layer) on the tiny mmseg ViT of seg_helpers."""
    return _tiny_vit_segmentor(dict(type='DEPICTHead', mode='sa', in_channels=24, channels=24,
                                    num_classes=5, num_layers=1, num_heads=2, head_dims=12))


def cbt_head_segmentor() -> nn.Module:
    """CBT head (1 CBSA layer, 2×2 representatives) on the tiny mmseg ViT of seg_helpers."""
    return _tiny_vit_segmentor(dict(type='CBTHead', in_channels=24, channels=24, num_classes=5,
                                    num_layers=1, num_heads=2, head_dims=12, num_reps=4))


def mita_segmenter() -> nn.Module:
    """configs/cbt/mita-nano_cbt-head_1xb8-mini-ade20k-128x128.py (MiTA encoder + CBT
    head) with 1 encoder block, 2×2 landmarks, 4 routed keys, 1 decoder layer with 2×2
    representatives and 5 classes, for 32×32 inputs."""
    scope, cfg = _from_config(
        'cbt/mita-nano_cbt-head_1xb8-mini-ade20k-128x128.py',
        **{'data_preprocessor.size': (32, 32), 'backbone.img_size': 32,
           'backbone.arch.num_layers': 1,
           'backbone.arch.attn_cfg': dict(num_landmarks=4, topk=4),
           'decode_head.num_layers': 1, 'decode_head.num_classes': 5,
           'decode_head.num_reps': 4})
    return _build(scope, cfg)


def primal_classifier() -> nn.Module:
    """KSVDImageClassifier over a 2-block PrimalFormer (width 32, s = 3, rank_multi 2:
    6 of the 17 tokens sampled; the KSVD loss is the mean over 2 layers), 10 classes,
    η = 0.05."""
    return _build('mmpretrain', dict(
        type='KSVDImageClassifier', ksvd_weight=0.05,
        backbone=dict(type='WhiteBoxViT', img_size=32, patch_size=8,
                      arch=dict(base='primalformer-small', embed_dims=32, num_layers=2,
                                num_heads=2, attn_cfg=dict(low_rank=3, rank_multi=2))),
        head=dict(type='LinearClsHead', num_classes=10, in_channels=32)))


def cbt_segmenter() -> nn.Module:
    """configs/cbt/cbt-small_cbt-head_8xb1-160k_ade20k-512x512.py (the fully linear
    segmenter: CBT encoder + CBT head) at width 32: 1 encoder block (2 heads of width 16,
    2×2 representatives, patch 8), 1 decoder layer, 5 classes, for 32×32 inputs."""
    scope, cfg = _from_config(
        'cbt/cbt-small_cbt-head_8xb1-160k_ade20k-512x512.py',
        **{'data_preprocessor.size': (32, 32), 'backbone.img_size': 32,
           'backbone.patch_size': 8,
           'backbone.arch': dict(base='cbt-small', embed_dims=32, num_layers=1, num_heads=2,
                                 attn_cfg=dict(head_dims=16, num_reps=4)),
           'decode_head.in_channels': 32, 'decode_head.channels': 32,
           'decode_head.num_layers': 1, 'decode_head.num_heads': 2,
           'decode_head.head_dims': 12, 'decode_head.num_reps': 4,
           'decode_head.num_classes': 5})
    return _build(scope, cfg)


def _whitebox_classifier(config: str, base: str, attn_cfg: dict) -> nn.Module:
    """The classifier of ``config`` with its WhiteBoxViT at width 32 (1 block, 2 heads,
    patch 8, 32×32 images) and 10 classes (no Mixup/CutMix batch augments: DeiT's recipe
    has them, and they need the data preprocessor's 1000 classes)."""
    scope, cfg = _from_config(config, **{
        'train_cfg': None,
        'backbone.img_size': 32, 'backbone.patch_size': 8,
        'backbone.arch': dict(base=base, embed_dims=32, num_layers=1, num_heads=2,
                              attn_cfg=attn_cfg),
        'head.in_channels': 32, 'head.num_classes': 10, 'head.topk': (1, )})
    return _build(scope, cfg)


def tost_classifier() -> nn.Module:
    """configs/tost/tost-tiny_8xb32-lion-150e_in1k.py at toy size (TSSA + ISTA)."""
    return _whitebox_classifier('tost/tost-tiny_8xb32-lion-150e_in1k.py', 'tost-tiny',
                                dict(head_dims=16))


def crate_classifier() -> nn.Module:
    """configs/crate/crate-tiny_8xb32-lion-150e_in1k.py at toy size (MSSA + ISTA)."""
    return _whitebox_classifier('crate/crate-tiny_8xb32-lion-150e_in1k.py', 'crate-tiny',
                                dict(head_dims=16))


def mita_deit_classifier() -> nn.Module:
    """configs/mita/mita-dwc-gate-deit-small_4xb256_in1k.py at toy size (MiTA +DWC,Gate
    in a DeiT block, 2×2 landmarks, 4 routed keys)."""
    return _whitebox_classifier('mita/mita-dwc-gate-deit-small_4xb256_in1k.py',
                                'mita-deit-small', dict(num_landmarks=4, topk=4))


def adapted_vit_classifier() -> nn.Module:
    """configs/vit_adapt/vit-tiny-p16_cbsa-adapt_8xb64-50e_in1k.py (mmpretrain's ViT with
    the CBSA-style adapted attention) at width 32: 1 block, 2 heads, patch 8, 2×2
    representatives, no pretrained weights."""
    scope, cfg = _from_config('vit_adapt/vit-tiny-p16_cbsa-adapt_8xb64-50e_in1k.py', **{
        'init_cfg': None, 'backbone.img_size': 32, 'backbone.patch_size': 8,
        'backbone.arch': dict(embed_dims=32, num_layers=1, num_heads=2,
                              feedforward_channels=64),
        'backbone.adapt_cfg': dict(num_reps=4), 'head.in_channels': 32, 'head.num_classes': 10,
        'head.topk': (1, )})
    return _build(scope, cfg)


@dataclass(frozen=True)
class FamilyCase:
    """A model family: ``build()`` returns the model (train mode not set), inputs are
    ``(batch, 3, *hw)`` images; ``task`` is ``'cls'`` (mmpretrain ``DataSample`` labels
    in ``[0, num_classes)``) or ``'seg'`` (mmseg ``SegDataSample`` masks that follow the
    image)."""
    id: str
    build: Callable[[], nn.Module]
    task: str
    num_classes: int
    hw: Tuple[int, int] = (32, 32)
    batch: int = 2
    extra: dict = field(default_factory=dict)

    def images(self) -> torch.Tensor:
        return torch.randn(self.batch, 3, *self.hw,
                           generator=torch.Generator().manual_seed(2))

    def batch_data(self, model: nn.Module) -> dict:
        """A fixed mmengine data batch (``inputs``, ``data_samples``) for
        ``model.train_step``: for a ``SegDataPreProcessor`` the images as a list of
        0..255 pixel tensors (what mmengine's collate gives it; it normalises them),
        otherwise the stacked tensor of :meth:`images`; and the labels."""
        gen = torch.Generator().manual_seed(3)
        imgs = self.images()
        if self.task == 'cls':
            from mmpretrain.structures import DataSample
            labels = torch.randint(0, self.num_classes, (self.batch, ), generator=gen)
            samples = [DataSample().set_gt_label(int(y)) for y in labels]
        else:
            from mmengine.structures import PixelData
            from mmseg.structures import SegDataSample
            # masks a model can learn: the class of a pixel is its first channel's value
            # bucketed into num_classes intervals
            h, w = self.hw
            bounds = torch.linspace(-1, 1, self.num_classes - 1)
            samples = []
            for img in imgs:
                s = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w),
                                                pad_shape=(h, w)))
                s.gt_sem_seg = PixelData(data=torch.bucketize(img[:1], bounds))
                samples.append(s)
        from mmseg.models import SegDataPreProcessor
        if isinstance(model.data_preprocessor, SegDataPreProcessor):  # pixels, normalised there
            return dict(inputs=list((imgs.clamp(-2, 2) * 60 + 127.5).round()),
                        data_samples=samples)
        return dict(inputs=imgs, data_samples=samples)


FAMILIES = [
    FamilyCase('cbt-classifier', cbt_classifier, 'cls', 10),
    FamilyCase('depict-segmentor', depict_segmentor, 'seg', 5),
    FamilyCase('cbt-head-segmentor', cbt_head_segmentor, 'seg', 5),
    FamilyCase('mita-segmenter', mita_segmenter, 'seg', 5),
    FamilyCase('primal-classifier', primal_classifier, 'cls', 10),
    FamilyCase('cbt-segmenter', cbt_segmenter, 'seg', 5),
    FamilyCase('tost-classifier', tost_classifier, 'cls', 10),
    FamilyCase('crate-classifier', crate_classifier, 'cls', 10),
    FamilyCase('mita-deit-classifier', mita_deit_classifier, 'cls', 10),
    FamilyCase('adapted-vit-classifier', adapted_vit_classifier, 'cls', 10),
]


# ------------------------------------------------------------------ a tiny Runner config
_TINY_SEG_CONFIG = '''
_base_ = [{base!r}]
data_root = {data!r}
crop_size = (32, 32)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='PackSegInputs')
]
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(img_size=crop_size, embed_dims=32, num_layers=1, num_heads=2),
    decode_head=dict(_delete_=True, type='CBTHead', in_channels=32, channels=32,
                     num_classes=150, num_layers=1, num_heads=2, head_dims=16, num_reps=4,
                     dropout_ratio=0.0, align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                                      loss_weight=1.0)))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
optim_wrapper = dict(_delete_=True, type='OptimWrapper',
                     optimizer=dict(type='SGD', lr=0.01, momentum=0.9))
param_scheduler = []
train_cfg = dict(max_iters={max_iters}, val_interval=1000)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1000))
'''


def tiny_seg_runner_cfg(root, name: str, max_iters: int = 3) -> Config:
    """A Runner config for a 1-block mmseg ViT (width 32) + 1-layer CBT head on 32×32
    crops of a 4-image synthetic mini ADE20K (written once under ``root``; the quick-start
    config is the base), SGD, ``max_iters`` iterations, work_dir ``root/name``."""
    root = Path(root)
    data = root / 'mini_ade20k'
    if not (data / 'annotations').is_dir():
        spec = importlib.util.spec_from_file_location(
            'make_mini_dataset', REPO / 'tools/misc/make_mini_dataset.py')
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        tool.main(['--dataset', 'ade20k', '--out', str(data), '--num-train', '4',
                   '--num-val', '1', '--size', '40', '48'])
    path = root / f'tiny_{name}.py'
    base = REPO / 'configs/depict/depict-sa_vit-tiny-p8_1xb8-300it_mini-ade20k-128x128.py'
    path.write_text(_TINY_SEG_CONFIG.format(base=str(base), data=str(data),
                                            max_iters=max_iters))
    cfg = Config.fromfile(str(path))
    cfg.work_dir = str(root / name)
    return cfg
