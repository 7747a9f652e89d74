"""ONNX export (mmcbsa.deployment, tools/deployment/pytorch2onnx.py; docs/deployment.md).

* every model family of ``model_cases.FAMILIES`` (plus DEPICT-CA) exports once with a
  dynamic batch, height and width, and onnxruntime equals PyTorch eager within 1e-4 at
  two other sizes and batches from that one file; the graph holds standard ONNX
  operators only (no MiTA kernel, no custom autograd Function);
* a static export is fixed to its shape; what cannot be dynamic (the reference pooling of
  released checkpoints) is refused with a reason instead of a silently fixed graph;
* the pieces that make graphs size-independent: the matrix form of adaptive pooling, the
  position-embedding rewrites, Primal's traced sample positions;
* the tool: the quick-start config with a checkpoint exports and ``--verify`` passes from
  the README's command; a user's mistake is one line and exit status 2.

Needs the deploy extra (onnx, onnxruntime, onnxscript), which tools/setup_env.sh installs.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

onnx = pytest.importorskip('onnx', reason='the deploy extra: pip install -e ".[deploy]"')
pytest.importorskip('onnxruntime', reason='the deploy extra: pip install -e ".[deploy]"')

from model_cases import FAMILIES, FamilyCase, _tiny_vit_segmentor  # noqa: E402

from mmcbsa.deployment import (export_onnx, export_rewrites,  # noqa: E402
                               resize_pos_embed_always, run_onnx, size_divisor, verify_onnx)
from mmcbsa.models.attentions.base import adaptive_avg_pool2d_any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / 'configs/depict/depict-sa_vit-tiny-p8_1xb8-300it_mini-ade20k-128x128.py'
TOL = 1e-4


def depict_ca_segmentor():
    """DEPICT-CA head (1 self- and 1 cross-attention layer) on the tiny mmseg ViT."""
    return _tiny_vit_segmentor(dict(type='DEPICTHead', mode='ca', in_channels=24, channels=24,
                                    num_classes=5, num_layers=1, num_heads=2, head_dims=12,
                                    ca_num_layers=1, ca_num_heads=2, ca_head_dims=12))


def adapted_vit_segmentor():
    """mmseg's ViT with the CBSA-style adapted attention (configs/vit_adapt/, mmseg
    ``AdaptedVisionTransformer``: 2 layers of width 24, 2×2 representatives) and a
    DEPICT-SA head."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS
    init_default_scope('mmseg')
    return MODELS.build(dict(
        type='EncoderDecoder',
        backbone=dict(type='AdaptedVisionTransformer', img_size=(32, 32), patch_size=8,
                      embed_dims=24, num_layers=2, num_heads=2, mlp_ratio=2, out_indices=(1, ),
                      final_norm=True, with_cls_token=True, interpolate_mode='bicubic',
                      adapt_cfg=dict(num_reps=4)),
        decode_head=dict(type='DEPICTHead', mode='sa', in_channels=24, channels=24,
                         num_classes=5, num_layers=1, num_heads=2, head_dims=12),
        test_cfg=dict(mode='whole')))


CASES = FAMILIES + [FamilyCase('depict-ca-segmentor', depict_ca_segmentor, 'seg', 5),
                    FamilyCase('adapted-vit-segmentor', adapted_vit_segmentor, 'seg', 5)]


def _images(batch, h, w, seed):
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _dims(path):
    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return model, [d.dim_param or d.dim_value for d in dims]


@pytest.mark.parametrize('case', CASES, ids=[c.id for c in CASES])
def test_family_exports_with_dynamic_shape(case, tmp_path):
    torch.manual_seed(0)
    model = case.build().eval()
    report = export_onnx(model, str(tmp_path / f'{case.id}.onnx'), (32, 32), batch=2,
                         dynamic=True)
    graph, dims = _dims(report.path)
    assert [isinstance(d, str) for d in dims] == [True, False, True, True], dims
    # standard operators only: the MiTA kernel, Triton and autograd Functions stay out
    assert {n.domain for n in graph.graph.node} <= {'', 'ai.onnx'}, \
        {n.op_type for n in graph.graph.node if n.domain not in ('', 'ai.onnx')}
    # two sizes other than the traced one (not multiples of the representative grids),
    # batches of 3 and 1, one file
    rows = verify_onnx(report.path, model, [_images(3, 48, 40, 1), _images(1, 24, 56, 2)])
    for row in rows:
        assert row['max_abs_error'] <= TOL, row
        if case.task == 'seg':
            assert row['label_mismatch'] == 0.0, row
        else:
            assert row['max_abs_error_scores'] <= TOL, row
    assert [r['shape'] for r in rows] == [(3, 3, 48, 40), (1, 3, 24, 56)]


def test_static_export_is_fixed_to_its_shape(tmp_path):
    model = CASES[2].build().eval()  # CBT head on the tiny mmseg ViT
    path = tmp_path / 'static.onnx'
    report = export_onnx(model, str(path), (40, 32), batch=1)
    assert _dims(path)[1] == [1, 3, 40, 32]
    assert report.task == 'seg' and report.output_names == ('logits', 'label')
    logits, label = run_onnx(str(path), _images(1, 40, 32, 3))
    assert logits.shape == (1, 5, 40, 32) and label.shape == (1, 1, 40, 32)
    assert label.dtype == torch.int64 and torch.equal(label, logits.argmax(1, keepdim=True))
    assert verify_onnx(str(path), model, [_images(1, 40, 32, 4)])[0]['max_abs_error'] <= TOL


def test_classifier_outputs_are_logits_and_softmax(tmp_path):
    model = CASES[0].build().eval()
    path = tmp_path / 'cls.onnx'
    export_onnx(model, str(path), (32, 32), batch=2)
    x = _images(2, 32, 32, 5)
    logits, scores = run_onnx(str(path), x)
    with torch.no_grad():
        expected = model(x, mode='tensor')
    assert (logits - expected).abs().max() <= TOL
    assert torch.allclose(scores, F.softmax(expected, 1), atol=1e-6)


def test_reference_pooling_cannot_be_dynamic(tmp_path):
    """``legacy_pooling`` (the released checkpoints) pools a square of N - 1 tokens:
    its graph depends on N, so a dynamic export is refused, naming the reason."""
    from model_cases import _from_config, _build
    scope, cfg = _from_config('cbt/cbt-nano-p8_1xb8-lion-2e_mini-in1k-64px.py', **{
        'backbone.arch.num_layers': 1, 'backbone.arch.attn_cfg.legacy_pooling': True,
        'head.num_classes': 10, 'head.topk': (1, )})
    model = _build(scope, cfg).eval()
    with pytest.raises(ValueError, match='fixed to input .*without --dynamic-shape'):
        export_onnx(model, str(tmp_path / 'legacy.onnx'), (32, 32), dynamic=True)
    path = tmp_path / 'legacy_static.onnx'
    export_onnx(model, str(path), (32, 32))
    assert verify_onnx(str(path), model, [_images(1, 32, 32, 6)])[0]['max_abs_error'] <= TOL


@pytest.mark.parametrize('size,grid', [((8, 8), (2, 2)), ((7, 5), (3, 2)), ((5, 9), (4, 4)),
                                       ((2, 3), (4, 4))])
def test_adaptive_pool_as_matrices_equals_the_kernel(size, grid):
    """The export form of adaptive pooling: PyTorch's bins (overlapping when the grid does
    not divide the size, repeated when it is larger), as two matrix products."""
    img = torch.randn(2, 3, *size, dtype=torch.float64)

    class Pool(torch.nn.Module):
        def forward(self, x):
            return adaptive_avg_pool2d_any(x, grid)

    program = torch.export.export(Pool(), (img, ), dynamic_shapes={'x': {
        2: torch.export.Dim('h', min=2), 3: torch.export.Dim('w', min=2)}}, strict=False)
    for h, w in (size, (size[0] + 3, size[1] + 1)):
        x = torch.randn(2, 3, h, w, dtype=torch.float64)
        expected = F.adaptive_avg_pool2d(x, grid)
        assert (program.module()(x) - expected).abs().max() <= 1e-12
    # eager (not exporting): the pooling kernel itself
    assert torch.equal(adaptive_avg_pool2d_any(img, grid), F.adaptive_avg_pool2d(img, grid))
    # channels last
    cl = adaptive_avg_pool2d_any(img.permute(0, 2, 3, 1), grid, channels_last=True)
    assert torch.equal(cl, F.adaptive_avg_pool2d(img, grid).permute(0, 2, 3, 1))


def test_pos_embed_rewrites_are_exact_and_scoped():
    from mmpretrain.models.backbones import vision_transformer
    from mmpretrain.models.utils import resize_pos_embed
    from mmseg.models.backbones.vit import VisionTransformer

    pos = torch.randn(1, 1 + 4 * 6, 8)
    # same grid: bicubic resizing returns the table itself
    assert torch.equal(resize_pos_embed_always(pos, (4, 6), (4, 6)), pos)
    # another grid: mmpretrain's own resizing
    assert torch.equal(resize_pos_embed_always(pos, (4, 6), (5, 3)),
                       resize_pos_embed(pos, (4, 6), (5, 3)))
    with pytest.raises(ValueError, match='does not match the grid'):
        resize_pos_embed_always(pos, (4, 5), (4, 5))
    original = VisionTransformer._pos_embeding
    with export_rewrites():
        assert vision_transformer.resize_pos_embed is resize_pos_embed_always
        assert VisionTransformer._pos_embeding is not original
    assert vision_transformer.resize_pos_embed is resize_pos_embed
    assert VisionTransformer._pos_embeding is original


def test_size_divisor():
    assert size_divisor(CASES[0].build()) == 8  # WhiteBoxViT patch_size
    assert size_divisor(CASES[1].build()) == 8  # mmseg ViT
    assert size_divisor(CASES[9].build()) == 8  # mmpretrain ViT: patch_embed stride
    assert size_divisor(torch.nn.Linear(2, 2)) == 32


# ---------------------------------------------------------------------------------------
# the tool
# ---------------------------------------------------------------------------------------
def _tool():
    spec = importlib.util.spec_from_file_location(
        'pytorch2onnx', REPO / 'tools/deployment/pytorch2onnx.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.fixture(scope='module')
def quickstart(tmp_path_factory):
    """The quick-start config's model saved as an mmengine checkpoint, and 2 validation
    images of a generated mini ADE20K."""
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    from mmcbsa.analysis.runtime import build_model
    root = tmp_path_factory.mktemp('deploy')
    data = root / 'mini_ade20k'
    subprocess.run([sys.executable, str(REPO / 'tools/misc/make_mini_dataset.py'), '--dataset',
                    'ade20k', '--out', str(data), '--num-train', '1', '--num-val', '2',
                    '--size', '96', '112'], check=True, capture_output=True)
    saved = DefaultScope._instance_dict.copy()  # module fixture: outside conftest's reset
    try:
        model = build_model(Config.fromfile(str(QUICKSTART)))
    finally:
        DefaultScope._instance_dict.clear()
        DefaultScope._instance_dict.update(saved)
    ckpt = root / 'iter_300.pth'
    torch.save(dict(meta=dict(iter=300), state_dict=model.state_dict()), ckpt)
    return ckpt, data


def test_quickstart_command_exports_and_verifies(quickstart, tmp_path):
    """The README's command (docs/deployment.md), as a user runs it."""
    ckpt, data = quickstart
    out = tmp_path / 'quickstart.onnx'
    proc = subprocess.run(
        [sys.executable, 'tools/deployment/pytorch2onnx.py', str(QUICKSTART), str(ckpt),
         '--out', str(out), '--dynamic-shape', '--verify',
         '--cfg-options', f'test_dataloader.dataset.data_root={data}'],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONWARNINGS='ignore', TORCH_FORCE_WEIGHTS_ONLY_LOAD='1'))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith('pytorch2onnx.py:')]
    assert f'wrote {out}' in lines[0] and 'any B, H and W multiples of 8' in lines[0]
    verify = [line for line in lines if 'verify input' in line]
    # the traced size (the config's crop, 128x128) and a second size with batch 2
    assert '(1, 3, 128, 128)' in verify[0] and '(2, 3, 136, 144)' in verify[1]
    for line in verify:
        error = float(line.split('logits max abs error ')[1].split(',')[0])
        assert error <= TOL, line
    assert out.is_file()


def test_tool_returns_what_it_printed(quickstart, tmp_path, capsys):
    ckpt, data = quickstart
    result = _tool().main([str(QUICKSTART), str(ckpt), '--out', str(tmp_path / 'q.onnx'),
                           '--shape', '64', '96', '--batch', '2', '--verify', '--benchmark', '1',
                           '--cfg-options', f'test_dataloader.dataset.data_root={data}',
                           # a pretrained init_cfg is not downloaded: the checkpoint
                           # replaces every tensor (offline here)
                           'model.pretrained=https://example.invalid/vit.pth'])
    assert result['report'].shape == (64, 96) and not result['report'].dynamic
    assert [r['shape'] for r in result['verify']] == [(2, 3, 64, 96)]
    assert result['verify'][0]['max_abs_error'] <= TOL
    bench = result['benchmark']
    assert bench['ort_ms'] > 0 and bench['torch_ms'] > 0
    assert abs(bench['ratio'] - bench['ort_ms'] / bench['torch_ms']) < 1e-9
    assert 'CPU latency at (2, 3, 64, 96)' in capsys.readouterr().out


@pytest.mark.parametrize('args,message', [
    (['{cfg}', 'missing.pth', '--out', '{out}'], 'checkpoint not found: missing.pth'),
    (['missing.py', '{ckpt}', '--out', '{out}'], 'config file not found: missing.py'),
    ([str(REPO / 'configs/_base_/datasets/mini_ade20k.py'), '{ckpt}', '--out', '{out}'],
     'defines no model'),
    (['{cfg}', '{ckpt}', '--out', '{out}', '--shape', '100', '128'],
     '--shape 100 128: height and width must be multiples of the patch size 8'),
    (['{cfg}', '{ckpt}', '--out', '{out}', '--batch', '0'], '--batch must be a positive'),
    (['{cfg}', '{ckpt}', '--out', '{out}', '--opset', '7'], '--opset must be between 18'),
    (['{cfg}', '{ckpt}', '--out', '{out}', '--verify', '--verify-image', str(REPO / 'README.md')],
     f"--verify: image {REPO / 'README.md'} cannot be read (failed to load image"),
    (['{cfg}', '{ckpt}', '--out', '{out}', '--verify', '--cfg-options',
      'test_dataloader.dataset.data_root=/nonexistent'], '--verify needs a test image'),
    (['{cfg}', '{other}', '--out', '{out}'], 'does not fit the model'),
    (['{cfg}', '{corrupt}', '--out', '{out}'], 'corrupt.pth is truncated or corrupt'),
])
def test_user_mistakes_are_one_line(quickstart, tmp_path, capsys, args, message):
    ckpt, _ = quickstart
    other = tmp_path / 'other.pth'
    torch.save(dict(state_dict=dict(weight=torch.zeros(2))), other)
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(b'not a checkpoint')
    fill = dict(cfg=str(QUICKSTART), ckpt=str(ckpt), out=str(tmp_path / 'x.onnx'),
                other=str(other), corrupt=str(corrupt))
    with pytest.raises(SystemExit) as exc:
        _tool().main([a.format(**fill) for a in args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('pytorch2onnx.py: error: '), err
    assert message in err[0], err[0]


def test_missing_extra_is_one_line(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'onnxscript' else real(name, *a))
    with pytest.raises(SystemExit) as exc:
        _tool().main(['c.py', 'k.pth', '--out', str(tmp_path / 'x.onnx')])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ('pytorch2onnx.py: error: ONNX export needs onnxscript: pip install -e '
                   '".[deploy]" (onnx, onnxruntime, onnxscript)')


# ---------------------------------------------------------------------------------------
# OpenMMLab parts with size-dependent code (the mixing configs' backbones and heads)
# ---------------------------------------------------------------------------------------
def _psp_segmentor():
    """mmseg's PSPHead (pyramid pooling: nn.AdaptiveAvgPool2d to 1, 2, 3, 6) on the tiny
    mmseg ViT, as UperNet's pooling in configs/mixing/cbt-s_upernet_*."""
    return _tiny_vit_segmentor(dict(type='PSPHead', in_channels=24, channels=8,
                                    pool_scales=(1, 2, 3, 6), num_classes=5))


def test_pyramid_pooling_exports_for_every_size(tmp_path):
    model = _psp_segmentor().eval()
    path = tmp_path / 'psp.onnx'
    export_onnx(model, str(path), (32, 32), batch=2, dynamic=True)
    rows = verify_onnx(str(path), model, [_images(3, 48, 40, 1), _images(1, 24, 56, 2)])
    assert all(r['max_abs_error'] <= TOL and r['label_mismatch'] == 0 for r in rows), rows


def test_a_graph_that_keeps_the_traced_size_is_refused(tmp_path, monkeypatch):
    """Without the pooling rewrite, the ONNX pooling keeps the traced windows: the
    check at another size refuses the file instead of writing a wrong graph."""
    import torch.nn as nn

    from mmcbsa.deployment import rewrites
    monkeypatch.setattr(rewrites, '_adaptive_avg_pool_forward', nn.AdaptiveAvgPool2d.forward)
    path = tmp_path / 'psp.onnx'
    with pytest.raises(ValueError, match='differs from the model at input .*traced size'):
        export_onnx(_psp_segmentor().eval(), str(path), (32, 32), batch=2, dynamic=True)
    assert not path.exists()


def test_a_model_that_fixes_the_batch_is_refused_in_one_line(tmp_path):
    """Code that turns the batch size into a Python number (as mmseg's Swin does in its
    window partition; measured on configs/mixing/*swin*: refused the same way, 16 s static
    export fine) cannot have a dynamic batch: one ValueError, and the static export works."""
    model = CASES[2].build().eval()  # CBT head on the tiny mmseg ViT
    head_forward = model.decode_head.forward

    def fixed_batch(inputs):
        out = head_forward(inputs)
        return out.reshape(int(out.shape[0]), *out.shape[1:])  # int() fixes the batch

    model.decode_head.forward = fixed_batch
    with pytest.raises(ValueError, match='cannot be exported with a dynamic batch and size: '
                       'Constraints violated'):
        export_onnx(model, str(tmp_path / 'fixed.onnx'), (32, 32), batch=2, dynamic=True)
    path = tmp_path / 'static.onnx'
    export_onnx(model, str(path), (32, 32))
    assert verify_onnx(str(path), model, [_images(1, 32, 32, 3)])[0]['max_abs_error'] <= TOL
