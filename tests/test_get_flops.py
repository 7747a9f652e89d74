"""FLOP counting (mmcbsa.analysis.model_complexity and tools/analysis_tools/get_flops.py).

Every attention layer is checked against a multiply-add count written here from the
formulas (docs/mechanisms.md §1, §2, §5; one fused multiply-add = one FLOP), with
sizes chosen so that no two terms coincide (head width != embed_dims / heads where the
module allows it, non-square grids, a prefix token).
"""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.analysis import FlopAnalyzer
from mmengine.config import Config

from mmcbsa.analysis import (NO_MAC_OPS, build_model_from_config, flop_analyzer,
                             input_shape_from_config, model_complexity)
from mmcbsa.models.attentions import CBSA, MHSA, MSSA, MiTA

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / 'tools' / 'analysis_tools' / 'get_flops.py'
SEG_CFG = REPO / 'configs' / 'depict' / 'depict-sa_vit-s_mask_8xb1-160k_ade20k-512x512.py'
CLS_CFG = REPO / 'configs' / 'cbt' / 'cbt-tiny_8xb32-lion-150e_in1k.py'


class _Call(nn.Module):
    """Calls an attention with a fixed ``hw_shape`` (tracing takes tensor inputs only)."""

    def __init__(self, attn: nn.Module, hw, **kwargs) -> None:
        super().__init__()
        self.attn, self.hw, self.kwargs = attn, hw, kwargs

    def forward(self, x, *context):
        if context:
            return self.attn(x, hw_shape=self.hw, context=context[0])
        return self.attn(x, hw_shape=self.hw, **self.kwargs)


def _count(attn: nn.Module, *inputs, hw=None) -> int:
    analyzer = flop_analyzer(_Call(attn.eval(), hw), inputs)
    total = analyzer.total()
    unknown = set(analyzer.unsupported_ops()) - NO_MAC_OPS
    assert not unknown, f'operators without a FLOP handle: {unknown}'
    return total


def test_cbsa_layer_flops_match_hand_count():
    b, c, heads, p, (h, w), grid = 2, 40, 2, 12, (4, 5), (2, 3)
    n, hp, m = 1 + h * w, heads * p, grid[0] * grid[1]
    attn = CBSA(c, heads, head_dims=p, num_reps=grid)
    x = torch.randn(b, n, c, requires_grad=True)  # the fused autograd path is not traced
    expected = b * (n * c * hp  # w = x Uᵀ
                    + m * hp * n  # R0 wᵀ (all heads)
                    + hp * n * m  # A w
                    + 2 * m * m * hp  # R Rᵀ and softmax(·) R
                    + hp * m * n  # Aᵀ Δ
                    + n * hp * c  # output projection
                    + hp * h * w)  # adaptive average pooling: one per pooled input
    assert _count(attn, x, hw=(h, w)) == expected


@pytest.mark.parametrize('out_proj', ['linear', 'tied'])
def test_mssa_layer_flops_match_hand_count(out_proj):
    """MSSA runs on SDPA, which mmengine alone does not count."""
    b, c, heads, p, n = 2, 40, 2, 12, 21
    hp = heads * p
    attn = MSSA(c, heads, head_dims=p, out_proj=out_proj)
    x = torch.randn(b, n, c)
    expected = b * (n * c * hp + heads * n * n * p * 2 + n * hp * c)
    assert _count(attn, x) == expected
    plain = FlopAnalyzer(_Call(attn, None), (x, ))
    plain.unsupported_ops_warnings(False)
    assert plain.total() == expected - b * heads * n * n * p * 2
    assert plain.unsupported_ops()['aten::scaled_dot_product_attention'] == 1


def test_mssa_cross_attention_flops_match_hand_count():
    b, c, heads, p, n, l_ctx = 1, 40, 2, 12, 7, 11
    hp = heads * p
    attn = MSSA(c, heads, head_dims=p, out_proj='tied')
    x, ctx = torch.randn(b, n, c), torch.randn(b, l_ctx, c)
    expected = b * ((n + l_ctx) * c * hp + heads * n * l_ctx * p * 2 + n * hp * c)
    assert _count(attn, x, ctx) == expected


def test_mhsa_layer_flops_match_hand_count():
    b, c, heads, n = 2, 40, 4, 21
    attn = MHSA(c, heads)
    expected = b * (n * c * 3 * c + 2 * n * n * c + n * c * c)
    assert _count(attn, torch.randn(b, n, c)) == expected


@pytest.mark.parametrize('grad', [True, False], ids=['autograd', 'no_grad-fast-path'])
def test_torch_multihead_attention_counted_on_every_path(grad):
    """``nn.MultiheadAttention`` (mmseg's ViT, through mmcv) takes a fused kernel in eval
    mode without autograd; both paths count projections and both products."""
    b, e, heads, n = 2, 32, 4, 10

    class Self(nn.Module):

        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(e, heads, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    model = Self().eval()
    expected = b * (3 * n * e * e + 2 * n * n * e + n * e * e)
    with torch.set_grad_enabled(grad):
        assert flop_analyzer(model, torch.randn(b, n, e)).total() == expected


def test_baddbmm_and_broadcast_matmul_counted():

    class Ops(nn.Module):

        def forward(self, x, y, z):
            return torch.baddbmm(z, x, y).sum() + torch.matmul(x[0], y).sum()

    x, y, z = torch.randn(3, 4, 5), torch.randn(3, 5, 6), torch.randn(3, 4, 6)
    # baddbmm: 3·4·5·6; matmul (4, 5) @ (3, 5, 6) broadcasts the first operand: 3·4·5·6
    assert flop_analyzer(Ops(), (x, y, z)).total() == 2 * 3 * 4 * 5 * 6


def _mita_experts(attn: MiTA, x: torch.Tensor, hw) -> torch.Tensor:
    """Expert of every query, recomputed with plain ops: ``argmax_m r_m · q_n``."""
    b, n, c = x.shape
    heads, p = attn.num_heads, c // attn.num_heads
    q = F.linear(x, attn.qkv.weight[:c], attn.qkv.bias[:c])
    img = q[:, n - hw[0] * hw[1]:].transpose(1, 2).reshape(b, c, *hw)
    r = F.adaptive_avg_pool2d(img, attn.landmark_grid).flatten(2).transpose(1, 2)
    qh = q.view(b, n, heads, p).transpose(1, 2)
    rh = r.reshape(b, -1, heads, p).transpose(1, 2)
    return (qh @ rh.transpose(-2, -1)).argmax(-1)  # (B, H, N)


def test_mita_dense_path_flops_match_hand_count():
    """MiTA's dense path (small N): all ``N × N`` query-key products and the value
    product over the scattered weights, plus the agent expert's four ``M × N`` products
    (``r kᵀ``, ``q rᵀ``, the agent values and their weighted sum)."""
    torch.manual_seed(0)
    b, c, heads, grid, topk, hw = 2, 24, 2, (2, 2), 3, (4, 4)
    n, m, p = 1 + hw[0] * hw[1], grid[0] * grid[1], c // heads
    attn = MiTA(c, heads, num_landmarks=grid, topk=topk, path='dense').eval()
    x = torch.randn(b, n, c)
    expected = (b * n * c * 3 * c  # qkv
                + b * c * hw[0] * hw[1]  # landmark pooling
                + b * heads * (2 * n * n * p  # q kᵀ and the value product
                               + 4 * m * n * p)  # r kᵀ, q rᵀ, agent values, agent output
                + b * n * c * c)  # output projection
    assert _count(attn, x, hw=hw) == expected


@pytest.mark.parametrize('block', [1, 4])
def test_mita_layer_flops_match_hand_count(block):
    """MiTA's grouped path runs a fixed number of blocks of ``query_block_size = T``
    queries per (sample, head), whatever the routing: each of the ``min(M, N)`` experts
    may leave one block partly filled, so ``min(M, N) + ⌊(N − min(M, N)) / T⌋`` blocks
    (here N = 17, M = 4: 17 blocks of one query, or 4 + 3 = 7 blocks of four). The real
    products are ``(M + k)·2p`` per slot, padding included; with blocks of one query
    there is no padding."""
    torch.manual_seed(0)
    b, c, heads, grid, topk, hw = 2, 24, 2, (2, 2), 3, (4, 4)
    n, m, p = 1 + hw[0] * hw[1], grid[0] * grid[1], c // heads
    attn = MiTA(c, heads, num_landmarks=grid, topk=topk, query_block_size=block,
                path='grouped').eval()
    x = torch.randn(b, n, c)
    slots = b * heads * {1: 17, 4: 7}[block] * block
    experts = _mita_experts(attn, x, hw)
    needed = sum(-(-int((g == e).sum()) // block) * block  # the routing's own blocks
                 for g in experts.reshape(b * heads, n) for e in range(m))
    assert needed <= slots
    expected = (b * n * c * 3 * c  # qkv
                + b * c * hw[0] * hw[1]  # landmark pooling
                + 3 * b * heads * m * n * p  # r kᵀ, softmax(·) v, q rᵀ (gate)
                + slots * (m + topk) * 2 * p  # one softmax over M agents + k routed keys
                + b * n * c * c)  # output projection
    assert _count(attn, x, hw=hw) == expected


def test_model_complexity_segmentor_counts_decode_head_sdpa():
    """The issue's case in miniature: DEPICT-SA on ViT-S (non-square input). mmengine
    alone misses exactly the decoder's SDPA products (3 layers over
    [patches; 150 classes], 3 heads of width 100) and the bicubic resize of the
    encoder's position embedding to the 4×6 grid (16 per output value, 384 channels)."""
    cfg = Config.fromfile(str(SEG_CFG))
    assert input_shape_from_config(cfg) == (512, 512)
    model = build_model_from_config(cfg)
    h, w = 64, 96
    ours = model_complexity(model, (3, h, w))
    tokens = (h // 16) * (w // 16) + 150
    sdpa = 3 * (2 * tokens * tokens * 3 * 100)
    bicubic = 16 * 384 * (h // 16) * (w // 16)

    class Tensor(nn.Module):

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x, mode='tensor')

    plain = FlopAnalyzer(Tensor(), (torch.randn(1, 3, h, w), ))
    plain.unsupported_ops_warnings(False)
    assert ours['flops'] - plain.total() == sdpa + bicubic
    assert plain.unsupported_ops()['aten::scaled_dot_product_attention'] == 3
    assert plain.unsupported_ops()['aten::upsample_bicubic2d'] == 1
    assert ours['unknown'] == {}
    assert ours['params'] == sum(p.numel() for p in model.parameters())


def _cli():
    spec = importlib.util.spec_from_file_location('get_flops', TOOL)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_get_flops_cli_mmpretrain_config(capsys):
    cli = _cli()
    result = cli.main([str(CLS_CFG), '--shape', '96', '128', '--table', '1'])
    out = capsys.readouterr().out
    model = build_model_from_config(Config.fromfile(str(CLS_CFG)))
    again = model_complexity(model, (3, 96, 128))
    assert result['flops'] == again['flops'] and result['params'] == again['params']
    assert f"FLOPs:   {again['flops']} " in out and 'input:   1x3x96x128' in out
    assert 'multiply-adds' in out and 'unknown operators (no FLOP handle, NOT counted): none' \
        in out
    assert '| module' in out and 'backbone' in out  # the per-module table


def test_get_flops_cli_primal_config(capsys):
    """Primal.+DeiT-S (sampled token positions, exact integers since torch.compile) is
    counted through mmengine's traced forward (it crashed: a traced size has no
    ``as_integer_ratio``), and the count equals the metafile's."""
    cfg = REPO / 'configs' / 'primal' / 'primal-deit-small_4xb256_in1k.py'
    result = _cli().main([str(cfg)])
    assert result['flops'] == 4593052992  # configs/primal/metafile.yml
    assert 'unknown operators (no FLOP handle, NOT counted): none' in capsys.readouterr().out


def test_get_flops_cli_mmseg_config(capsys):
    cli = _cli()
    result = cli.main([str(SEG_CFG), '--shape', '48', '--cfg-options',
                       'model.decode_head.num_layers=1'])
    out = capsys.readouterr().out
    assert 'default_scope=mmseg' in out and 'input:   1x3x48x48' in out
    tokens = 3 * 3 + 150
    assert result['by_operator']['scaled_dot_product_attention'] == 2 * tokens**2 * 300


@pytest.mark.parametrize('argv, message', [
    (['configs/nope/missing.py'], 'config file not found'),
    ([str(CLS_CFG), '--shape', '0', '64'], 'must be positive'),
    ([str(CLS_CFG), '--shape', '1', '2', '3'], '--shape takes H W'),
    ([str(CLS_CFG), '--cfg-options', 'model.backbone.foo=1'],
     "the config's model cannot be built: TypeError: "),
])
def test_get_flops_cli_user_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _cli().main(argv)
    assert exc.value.code == 2
    text = capsys.readouterr().err
    assert message in text and text.count('\n') == 1 and text.startswith('get_flops.py: error:')
