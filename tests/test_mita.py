"""MiTA (docs/mechanisms.md §5, §5b): parity with the reference fixture; the plain,
+DWC, +DWC,Gate and routed-only variants against a per-query reference written here
with plain loops (both execution paths, forward and gradients, float32); float64
gradcheck; dense vs grouped path; float32 routing under bf16 autocast; small inputs
(fewer tokens than ``topk``, more landmarks than patches); recording; torch.compile;
CUDA (marked); build errors and the converter."""
import contextlib
import math
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import fixture_params, load_fixture
from reference_configs import mita_attention

from mmcbsa.converters import convert_mita_attention
from mmcbsa.ops import once
from mmcbsa.models.attentions.mita import MiTA
from mmcbsa.models.attentions.mita_paths import expert_blocks, max_expert_blocks
from mmcbsa.ops import mita_cpu

PATHS = ('kernel', 'masked', 'dense', 'grouped')  # test_mita_cpu_kernel_builds: why if one fails


# --------------------------------------------------------------------------- reference
def _pool_by_hand(img, out_h, out_w):
    """Adaptive average pooling of ``img`` (h, w, C) written with explicit bins."""
    h, w, _ = img.shape
    rows = []
    for i in range(out_h):
        r0, r1 = (i * h) // out_h, -(-((i + 1) * h) // out_h)
        for j in range(out_w):
            c0, c1 = (j * w) // out_w, -(-((j + 1) * w) // out_w)
            rows.append(img[r0:r1, c0:c1].reshape(-1, img.shape[-1]).mean(0))
    return torch.stack(rows)  # (out_h*out_w, C)


def _dwc_by_hand(img, weight, bias):
    """3×3 depth-wise conv, zero padding, of ``img`` (h, w, C) -> (h*w, C)."""
    h, w, c = img.shape
    padded = torch.zeros(h + 2, w + 2, c, dtype=img.dtype)
    padded[1:-1, 1:-1] = img
    out = bias.expand(h, w, c).clone()
    for di in range(3):
        for dj in range(3):
            out = out + padded[di:di + h, dj:dj + w] * weight[:, 0, di, dj]
    return out.reshape(h * w, c)


def reference_mita(x, sd, heads, grid, topk, hw, legacy=False, routed=False):
    """§5/§5b one query at a time: explicit gathers of the routed keys, one softmax per
    query, loops over batch / head / query; no code from the module. ``sd`` holds
    ``qkv.*`` (or ``qkvg.*`` for the gated variant: chunks q, k, v, g), ``proj.*``
    and optionally ``dwc.*``."""
    b, n, c = x.shape
    p = c // heads
    gated = 'qkvg.weight' in sd
    name = 'qkvg' if gated else 'qkv'
    proj_in = x @ sd[f'{name}.weight'].T
    if f'{name}.bias' in sd:
        proj_in = proj_in + sd[f'{name}.bias']
    q, k, v = proj_in[..., :c], proj_in[..., c:2 * c], proj_in[..., 2 * c:3 * c]
    kk = min(topk, n)  # fewer tokens than topk: every expert routes to all N keys
    outs = []
    for bi in range(b):
        if legacy:
            side = math.isqrt(n)
            img = q[bi, :n - 1].reshape(side, side, c)
        else:
            img = q[bi, n - hw[0] * hw[1]:].reshape(hw[0], hw[1], c)
        lm = _pool_by_hand(img, *grid)  # (M, C)
        per_head = []
        for hd in range(heads):
            sl = slice(hd * p, (hd + 1) * p)
            r, qh, kh, vh = lm[:, sl], q[bi, :, sl], k[bi, :, sl], v[bi, :, sl]
            rk = r @ kh.T  # (M, N)
            experts = [torch.argsort(rk[m].detach(), descending=True)[:kk]
                       for m in range(r.shape[0])]
            agent_v = torch.softmax(rk / math.sqrt(p), dim=-1) @ vh  # (M, p)
            rows = []
            for i in range(n):
                e = int(torch.argmax((r @ qh[i]).detach()))
                keys = experts[e]
                k_sel, v_sel = kh[keys], vh[keys]  # explicit gather (k', p)
                routed_logits = k_sel @ qh[i] / math.sqrt(p)
                if routed:
                    rows.append(torch.softmax(routed_logits, dim=0) @ v_sel)
                    continue
                logits = torch.cat([r @ qh[i] / p, routed_logits])
                wts = torch.softmax(logits, dim=0)
                rows.append(wts[:r.shape[0]] @ agent_v + wts[r.shape[0]:] @ v_sel)
            per_head.append(torch.stack(rows))
        o = torch.cat(per_head, dim=-1)  # (N, C)
        if 'dwc.weight' in sd:
            npre = n - hw[0] * hw[1]
            local = _dwc_by_hand(v[bi, npre:].reshape(hw[0], hw[1], c), sd['dwc.weight'],
                                 sd['dwc.bias'])
            o = torch.cat([o[:npre], o[npre:] + local])
        if gated:
            g = proj_in[bi, :, 3 * c:]
            o = o * (g / (1 + torch.exp(-g)))  # SiLU
        outs.append(o)
    out = torch.stack(outs)
    return out @ sd['proj.weight'].T + sd['proj.bias']


def _random_module(dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    m = MiTA(**kwargs).to(dtype)
    with torch.no_grad():
        for prm in m.parameters():
            prm.normal_(0, 0.3)
    return m


# --------------------------------------------------------------------------- fixture parity
@pytest.mark.parametrize('path', fixture_params('mita_attention'))
def test_mita_matches_reference_fixture(path):
    fx = load_fixture(path)
    cfg, x = fx['config'], fx['input']
    kwargs = mita_attention(cfg)
    n = x.shape[1]
    side = math.isqrt(n - 1)  # [CLS; side×side patches], as recorded
    for exec_path in PATHS:
        attn = MiTA(**kwargs, path=exec_path).eval()
        attn.load_state_dict(convert_mita_attention(fx['state_dict']), strict=True)
        with torch.no_grad():
            out = attn(x, hw_shape=(side, side))
        assert out.shape == fx['output'].shape
        assert (out - fx['output']).abs().max().item() <= 1e-4, exec_path


# --------------------------------------------------------------------------- hand reference
CASES = {
    # name: (constructor kwargs, batch, prefix tokens, (h, w))
    'square-cls': (dict(num_landmarks=9, topk=6), 2, 1, (6, 6)),
    'nonsquare-grid': (dict(num_landmarks=(2, 3), topk=5), 2, 2, (5, 7)),
    'batch1-noprefix': (dict(num_landmarks=4, topk=3), 1, 0, (4, 5)),
    'n-below-landmarks': (dict(num_landmarks=16, topk=4), 2, 1, (2, 3)),
    'topk-above-n': (dict(num_landmarks=4, topk=40), 2, 1, (3, 5)),
    'dwc': (dict(num_landmarks=(3, 2), topk=4, dwc=True), 2, 1, (4, 6)),
    'legacy': (dict(num_landmarks=4, topk=5, legacy_pooling=True), 2, 1, (5, 5)),
    'legacy-dwc': (dict(num_landmarks=9, topk=7, legacy_pooling=True, dwc=True), 1, 1,
                   (6, 6)),
    'gate-dwc-square-cls': (dict(num_landmarks=9, topk=6, dwc=True, gate=True), 2, 1,
                            (6, 6)),
    'gate-nonsquare': (dict(num_landmarks=(2, 3), topk=5, gate=True), 2, 1, (5, 7)),
    'gate-dwc-legacy': (dict(num_landmarks=4, topk=4, dwc=True, gate=True,
                             legacy_pooling=True), 1, 1, (5, 5)),
    'routed-square-cls': (dict(num_landmarks=9, topk=8, mode='routed'), 2, 1, (6, 6)),
    'routed-gate-dwc-nonsquare': (dict(num_landmarks=(3, 2), topk=10, mode='routed',
                                       dwc=True, gate=True), 2, 2, (4, 7)),
    'routed-topk-above-n': (dict(num_landmarks=4, topk=50, mode='routed'), 1, 1, (4, 4)),
}


@pytest.mark.filterwarnings('ignore:MiTA.*landmarks')
@pytest.mark.parametrize('exec_path', PATHS)
@pytest.mark.parametrize('name', sorted(CASES))
def test_mita_matches_hand_reference_and_gradients(name, exec_path):
    kwargs, b, npre, hw = CASES[name]
    attn = _random_module(embed_dims=12, num_heads=2, qkv_bias=True, query_block_size=3,
                          path=exec_path, **kwargs)
    torch.manual_seed(1)
    x = torch.randn(b, npre + hw[0] * hw[1], 12, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    sd = {k: v.detach().clone().requires_grad_(True) for k, v in attn.state_dict().items()}
    out = attn(x, hw_shape=hw)
    ref = reference_mita(x_ref, sd, 2, attn.landmark_grid, kwargs['topk'], hw,
                         legacy=kwargs.get('legacy_pooling', False),
                         routed=kwargs.get('mode') == 'routed')
    assert out.shape == (b, x.shape[1], 12)
    tol = 2e-5 * ref.abs().max().item()
    assert (out - ref).abs().max().item() <= tol
    # gradients (landmarks get theirs through the agent path; top-k/argmax get none)
    cot = torch.randn_like(out)
    (out * cot).sum().backward()
    (ref * cot).sum().backward()
    tol = 5e-5 * x_ref.grad.abs().max().item()
    assert (x.grad - x_ref.grad).abs().max().item() <= tol
    for pname, prm in attn.named_parameters():
        scale = sd[pname].grad.abs().max().item()
        assert (prm.grad - sd[pname].grad).abs().max().item() <= 5e-5 * scale, pname


@pytest.mark.parametrize('exec_path', PATHS)
@pytest.mark.parametrize('variant', [dict(), dict(dwc=True, gate=True), dict(mode='routed')])
@pytest.mark.parametrize('npre,hw', [(1, (3, 3)), (2, (2, 3))])
def test_mita_float64_gradcheck(variant, npre, hw, exec_path):
    attn = _random_module(torch.float64, embed_dims=8, num_heads=2, num_landmarks=4,
                          topk=3, path=exec_path, **variant)
    torch.manual_seed(2)
    x = torch.randn(1, npre + hw[0] * hw[1], 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: attn(t, hw_shape=hw), (x, ), eps=1e-6,
                                    atol=1e-6, fast_mode=True)


@pytest.mark.parametrize('variant', [dict(), dict(dwc=True, gate=True), dict(mode='routed')])
def test_mita_execution_paths_agree(variant):
    """Every path, forced, on the same input: same output and gradients (float32)."""
    torch.manual_seed(3)
    modules = [MiTA(32, 4, num_landmarks=(3, 4), topk=9, path=p, query_block_size=5,
                    **variant) for p in PATHS]
    for attn in modules[1:]:
        attn.load_state_dict(modules[0].state_dict())
    x = torch.randn(3, 1 + 9 * 11, 32)
    results = []
    for attn in modules:
        xi = x.clone().requires_grad_(True)
        out = attn(xi, hw_shape=(9, 11))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach(), xi.grad] + [p.grad for p in attn.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())


def test_mita_auto_path_choice():
    attn = MiTA(32, 2)  # M = k = 25: dense up to N = 10·(25 + 25)
    assert attn.use_dense(197) and attn.use_dense(500) and not attn.use_dense(501)
    assert MiTA(32, 2, mode='routed', topk=50).use_dense(500)
    assert MiTA(32, 2, num_landmarks=49, topk=49).use_dense(980)
    assert not MiTA(32, 2, dense_max_tokens=100).use_dense(101)
    assert not MiTA(32, 2, path='grouped').use_dense(10)
    assert MiTA(32, 2, path='dense').use_dense(10 ** 6)
    # the compiled CPU kernel whenever it can run (any N), else the rule above
    x = torch.randn(1, 17, 32)
    assert attn.use_kernel(x, torch.float32, False)
    assert attn.use_kernel(x.double(), torch.float64, False)
    assert not attn.use_kernel(x, torch.bfloat16, False)  # reduced-precision autocast
    assert not attn.use_kernel(x, torch.float32, True)  # routing from outside
    assert not MiTA(32, 2, path='dense').use_kernel(x, torch.float32, False)
    # the masked path: forced, or automatic for CUDA inputs only
    assert MiTA(32, 2, path='masked').use_masked(x) and not attn.use_masked(x)
    assert not MiTA(32, 2, path='dense').use_masked(x)


def test_expert_blocks_by_hand():
    """The grouped path's bookkeeping on two routings worked out by hand (one group of
    N = 6 queries, M = 3 experts, blocks of T = 2): a fixed 3 + ⌊(6 − 3) / 2⌋ = 4 blocks
    whatever the routing; ``trim`` (CPU eager) keeps only the blocks the routing needs."""
    assert max_expert_blocks(6, 3, 2) == 4
    assert max_expert_blocks(2, 3, 2) == 2  # fewer queries than experts
    # experts 0 and 1 hold one query each (a padded block each), expert 2 four (2 blocks)
    slot_query, slot_valid, query_slot, block_expert = expert_blocks(
        torch.tensor([[2, 0, 2, 2, 1, 2]]), 3, 2)
    assert slot_query.tolist() == [1, 0, 4, 0, 0, 2, 3, 5]
    assert slot_valid.tolist() == [True, False, True, False, True, True, True, True]
    assert query_slot.tolist() == [4, 0, 5, 6, 2, 7]
    assert block_expert.tolist() == [0, 1, 2, 2]
    # all six on expert 0: three full blocks, then one padding block
    every = expert_blocks(torch.zeros(1, 6, dtype=torch.long), 3, 2)
    assert every[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 0]
    assert every[1].tolist() == [True] * 6 + [False] * 2
    assert every[2].tolist() == list(range(6)) and every[3].tolist() == [0, 0, 0, 2]
    trimmed = expert_blocks(torch.zeros(1, 6, dtype=torch.long), 3, 2, trim=True)
    assert trimmed[0].tolist() == list(range(6)) and trimmed[3].tolist() == [0, 0, 0]


@pytest.mark.parametrize('block', [1, 3, 4, 64])
def test_expert_blocks_hold_every_query_once(block):
    """Random and extreme routings of G = 3 groups: every query sits in exactly one valid
    slot, every block holds queries of one expert of its own group, the fixed count is
    never exceeded, and the bound is reached (counts 14, 1, 1, 1 at N = 17, M = 4, T = 4)."""
    n, m, g = 17, 4, 3
    torch.manual_seed(block)
    routings = [torch.randint(0, m, (g, n)), torch.zeros(g, n, dtype=torch.long),
                torch.arange(n).remainder(m).expand(g, n),
                torch.tensor([0] * 14 + [1, 2, 3]).expand(g, n)]
    for expert in routings:
        for trim in (False, True):
            slot_query, slot_valid, query_slot, block_expert = expert_blocks(
                expert, m, block, trim)
            fixed = g * max_expert_blocks(n, m, block)
            assert len(block_expert) * block == len(slot_query) == len(slot_valid)
            assert len(block_expert) == fixed if not trim else len(block_expert) <= fixed
            held = slot_query[slot_valid]
            assert sorted(held.tolist()) == list(range(g * n))  # each query once
            assert torch.equal(slot_query[query_slot], torch.arange(g * n))
            owner = block_expert.repeat_interleave(block)[slot_valid]
            assert torch.equal(owner, (expert.reshape(-1) + torch.arange(g).repeat_interleave(
                n) * m)[held])  # a slot's block belongs to its query's expert and group
            assert int(block_expert.max()) < g * m
    if block == 4:
        needed = expert_blocks(routings[3], m, block, trim=True)[3]
        assert len(needed) == g * max_expert_blocks(n, m, block) == g * 7


@pytest.mark.parametrize('max_blocks', [1, 3, 16384])
def test_mita_block_size_and_chunking_do_not_change_results(max_blocks):
    torch.manual_seed(2)
    base = MiTA(16, 2, num_landmarks=(2, 3), topk=7, dwc=True)
    x = torch.randn(3, 2 + 9 * 11, 16)
    results = []
    for block in (1, 4, 33, 1000):
        attn = MiTA(16, 2, num_landmarks=(2, 3), topk=7, dwc=True, query_block_size=block,
                    max_blocks_per_call=max_blocks, path='grouped')
        attn.load_state_dict(base.state_dict())
        xi = x.clone().requires_grad_(True)
        out = attn(xi, hw_shape=(9, 11))
        out.square().sum().backward()
        results.append((out.detach(), xi.grad, attn.qkv.weight.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- precision
def _token_drift(attn, x, hw, monkeypatch):
    """99th percentile over tokens of ‖y_bf16 − y_fp32‖ / ‖y_fp32‖, the float32 model's
    routing (``attention_maps``) and the decisions the bf16 forward itself took (its one
    call of ``route``, recorded here)."""
    from mmcbsa.models.attentions import mita as mita_module
    decided = []
    real = mita_module.route

    def recording_route(*args, **kwargs):
        decided.append(real(*args, **kwargs))
        return decided[-1]

    monkeypatch.setattr(mita_module, 'route', recording_route)
    with torch.no_grad():
        ref = attn(x, hw_shape=hw)
        maps = attn.attention_maps(x, hw_shape=hw)
        decided.clear()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = attn(x, hw_shape=hw)
    assert out.dtype == torch.bfloat16 and len(decided) == 1
    err = (out.float() - ref).norm(dim=-1) / ref.norm(dim=-1)
    key_idx, expert = decided[0]
    b, n, _ = x.shape
    routing16 = (expert.view(b, attn.num_heads, n),
                 key_idx.view(b, attn.num_heads, attn.num_landmarks, -1))
    return (torch.quantile(err.flatten(), 0.99).item(),
            (maps['expert'], maps['routed_keys']), routing16)


@pytest.mark.parametrize('hw', [(16, 16), (12, 20)])
@pytest.mark.parametrize('variant', [dict(), dict(dwc=True, gate=True), dict(mode='routed',
                                                                             topk=50),
                                     dict(path='grouped')])
def test_mita_bf16_autocast_routes_like_float32(hw, variant, monkeypatch):
    """§5b: routing in float32 under autocast. Before, the 99th percentile of the
    per-token relative error was ≈ 0.4 (routing flipped on bf16 near-ties)."""
    torch.manual_seed(4)
    attn = MiTA(192, 3, **variant).eval()  # default init: a realistic scale
    x = torch.randn(2, 1 + hw[0] * hw[1], 192)
    p99, routing32, routing16 = _token_drift(attn, x, hw, monkeypatch)
    assert p99 < 0.05
    expert32, keys32 = routing32
    expert16, keys16 = routing16
    assert torch.equal(expert32, expert16)  # the decisions of the float32 model
    # I_m is a set (its order depends on the execution path)
    assert torch.equal(keys32.sort(-1).values, keys16.sort(-1).values)


def test_mita_gradients_bf16_autocast_and_fp16():
    torch.manual_seed(3)
    attn = MiTA(32, 4, num_landmarks=4, topk=8, dwc=True, gate=True)
    x = torch.randn(2, 1 + 8 * 8, 32)
    for exec_path in ('dense', 'grouped'):
        attn.path = exec_path
        attn.zero_grad()
        x2 = x.clone().requires_grad_(True)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = attn(x2, hw_shape=(8, 8))
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
        out.float().sum().backward()
        grads = [x2.grad] + [p.grad for p in attn.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    ref = attn(x, hw_shape=(8, 8)).detach()
    out = attn.half()(x.half(), hw_shape=(8, 8))
    assert out.dtype == torch.float16
    err = (out.float() - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert torch.quantile(err.flatten(), 0.99) < 0.02


# --------------------------------------------------------------------------- small inputs
def test_mita_fewer_tokens_than_topk_routes_to_all_keys(monkeypatch):
    """issue 11: mmseg's segmentor tests use 4×4 images; MiTA with k = 49 routes to all
    ``min(k, N)`` keys instead of raising (the hand-reference cases ``*topk-above-n``
    check the values)."""
    monkeypatch.setattr(once, '_WARNED', set())
    attn = MiTA(48, 3, num_landmarks=49, topk=49)
    x = torch.randn(2, 2, 48)
    with pytest.warns(UserWarning, match='49 landmarks'):
        out = attn(x, hw_shape=(1, 1))  # N = 2 tokens
    assert out.shape == (2, 2, 48) and torch.isfinite(out).all()
    keys = attn.attention_maps(x, hw_shape=(1, 1))['routed_keys']
    assert keys.shape == (2, 3, 49, 2)
    assert (keys.sort(-1).values == torch.arange(2)).all()


def test_mita_warns_once_about_more_landmarks_than_patches(monkeypatch):
    monkeypatch.setattr(once, '_WARNED', set())
    attn = MiTA(24, 2, num_landmarks=(5, 5), topk=4)
    with pytest.warns(UserWarning, match=r'25 landmarks \(5x5\).*12 patch tokens \(3x4\)'):
        attn(torch.randn(1, 13, 24), hw_shape=(3, 4))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        attn(torch.randn(1, 13, 24), hw_shape=(3, 4))  # only once


def test_mita_attention_maps():
    """``attention_maps`` is a function of the input (no state in the module): the
    routing of §5.2/§5.4, recomputed here from the projections."""
    torch.manual_seed(5)
    attn = MiTA(24, 2, num_landmarks=(2, 3), topk=5)
    x = torch.randn(2, 1 + 4 * 5, 24, requires_grad=True)
    for _ in range(2):  # the same maps twice: nothing is kept between calls
        maps = attn.attention_maps(x, hw_shape=(4, 5))
        expert, keys = maps['expert'], maps['routed_keys']
        assert expert.shape == (2, 2, 21) and expert.dtype == torch.long
        assert keys.shape == (2, 2, 6, 5)
        assert not expert.requires_grad and set(vars(attn)) == set(vars(MiTA(24, 2)))
        with torch.no_grad():
            q, k = (x @ attn.qkv.weight.T + attn.qkv.bias)[..., :48].split(24, -1)
            img = q[:, 1:].reshape(2, 4, 5, 24).permute(0, 3, 1, 2)
            lm = torch.nn.functional.adaptive_avg_pool2d(img, (2, 3)).flatten(2)  # (B, C, M)
            for h in range(2):
                r, qh, kh = lm[:, h * 12:(h + 1) * 12], q[..., h * 12:(h + 1) * 12], \
                    k[..., h * 12:(h + 1) * 12]
                assert torch.equal(expert[:, h], (qh @ r).argmax(-1))
                top = (r.transpose(1, 2) @ kh.transpose(1, 2)).topk(5, -1).indices
                assert torch.equal(keys[:, h].sort(-1).values, top.sort(-1).values)


# --------------------------------------------------------------------------- torch.compile
def test_mita_compiles_and_matches_eager():
    """Every path under ``torch.compile`` is one graph (the kernel is one custom-op node;
    the grouped path's block count depends on the sizes only); forward and gradients
    equal eager.
    (The AOT-autograd backend captures the same forward/backward graphs inductor gets;
    inductor itself was checked by hand, its cold compile of this module takes 30-50 s.)"""
    torch.manual_seed(6)
    eager = MiTA(16, 2, num_landmarks=4, topk=5, dwc=True, gate=True)
    x = torch.randn(2, 1 + 4 * 5, 16)
    for exec_path in PATHS:
        eager.path = exec_path
        torch._dynamo.reset()
        explain = torch._dynamo.explain(eager)(x.clone().requires_grad_(True), hw_shape=(4, 5))
        assert explain.graph_count == 1 and explain.graph_break_count == 0, (
            exec_path, [str(r.reason) for r in explain.break_reasons])
        torch._dynamo.reset()
        compiled = torch.compile(eager, backend='aot_eager', dynamic=False)
        res = []
        for mod in (eager, compiled):
            mod.zero_grad()
            xi = x.clone().requires_grad_(True)
            out = mod(xi, hw_shape=(4, 5))
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            res.append([out.detach(), xi.grad] + [p.grad.clone() for p in eager.parameters()])
        for a, b in zip(*res):
            assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())
    torch._dynamo.reset()


# --------------------------------------------------------------------------- CPU kernel
def test_mita_cpu_kernel_builds():
    """The compiled kernel is built here (CI has a C compiler); if not, the reason."""
    assert mita_cpu.available(), mita_cpu.unavailable_reason()
    assert mita_cpu.unavailable_reason() is None


def test_mita_kernel_float64_matches_other_paths_at_large_n():
    """N = 1 + 32·40 (the grouped path's regime), float64 so that no routing decision
    sits on a rounding tie: kernel, dense and grouped agree to 1e-10, gradients too."""
    torch.manual_seed(8)
    base = MiTA(48, 3, num_landmarks=(3, 4), topk=70, dwc=True, gate=True).double()
    x = torch.randn(2, 1 + 32 * 40, 48, dtype=torch.float64)
    cot = torch.randn_like(x)
    results = []
    for exec_path in PATHS:
        attn = MiTA(48, 3, num_landmarks=(3, 4), topk=70, dwc=True, gate=True,
                    path=exec_path).double()
        attn.load_state_dict(base.state_dict())
        xi = x.clone().requires_grad_(True)
        out = attn(xi, hw_shape=(32, 40))
        (out * cot).sum().backward()
        results.append([out.detach(), xi.grad] + [p.grad for p in attn.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert (a - b).abs().max().item() <= 1e-10 * max(1.0, a.abs().max().item())


def test_mita_kernel_ties_threads_and_records():
    """Equal tokens (every routing score tied): the kernel gives the dense path's output;
    the result does not depend on the thread count; the routing of ``attention_maps``
    has the documented shapes and is a valid set of ``k'`` distinct keys."""
    attn = MiTA(32, 2, num_landmarks=4, topk=6, path='kernel')
    dense = MiTA(32, 2, num_landmarks=4, topk=6, path='dense')
    dense.load_state_dict(attn.state_dict())
    x = torch.randn(1, 1, 32).expand(2, 1 + 5 * 5, 32).contiguous()
    with torch.no_grad():
        out = attn(x, hw_shape=(5, 5))
        assert torch.allclose(out, dense(x, hw_shape=(5, 5)), atol=1e-6)
    keys = attn.attention_maps(x, hw_shape=(5, 5))['routed_keys']
    assert keys.shape == (2, 2, 4, 6)
    assert all(len(set(row.tolist())) == 6 for row in keys.reshape(-1, 6))
    torch.manual_seed(9)
    x = torch.randn(3, 1 + 7 * 9, 32)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                outs.append(attn(x, hw_shape=(7, 9)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])  # one (batch, head) group per thread: no races


def test_mita_kernel_falls_back_and_refuses(monkeypatch):
    """Without the kernel, path='auto' runs the PyTorch paths and path='kernel' names
    the reason; the kernel refuses inputs it does not support, naming the parameter."""
    x = torch.randn(2, 1 + 4 * 4, 32)
    attn = MiTA(32, 2, num_landmarks=4, topk=5)
    ref = attn(x, hw_shape=(4, 4))
    monkeypatch.setattr(mita_cpu, '_lib', None)
    monkeypatch.setattr(mita_cpu, '_reason', 'no C compiler (test)')
    assert not attn.use_kernel(x, torch.float32, False)
    assert torch.allclose(attn(x, hw_shape=(4, 4)), ref, atol=1e-6)
    attn.path = 'kernel'
    with pytest.raises(ValueError, match=r"path='kernel'.*no C compiler \(test\)"):
        attn(x, hw_shape=(4, 4))
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"path='kernel'.*float32 or float64"):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            attn(x, hw_shape=(4, 4))
    y = torch.randn(1, 17, 96)
    with pytest.raises(ValueError, match='topk=18'):
        mita_cpu.mita_forward(y, 2, 16, (1, 4, 4, 2, 2), 18, False)
    with pytest.raises(ValueError, match='width'):
        mita_cpu.mita_forward(y[..., :90], 2, 16, (1, 4, 4, 2, 2), 4, False)


def _build_mita_in_fresh_process(**env):
    """Build and run a MiTA in a new interpreter with ``env``; returns its two report lines:
    ``'<kernel available> <number of warnings> <first warning>'`` and the output shape."""
    code = ('import warnings, torch\n'
            'from mmcbsa.ops import mita_cpu\n'
            'from mmcbsa.models.attentions.mita import MiTA\n'
            'with warnings.catch_warnings(record=True) as w:\n'
            '    warnings.simplefilter("always")\n'
            '    attn = MiTA(32, 2, num_landmarks=4, topk=5)\n'
            'print(mita_cpu.available(), len(w), str(w[0].message))\n'
            'print(attn(torch.randn(1, 17, 32), hw_shape=(4, 4)).shape)\n')
    res = subprocess.run([sys.executable, '-c', code], env=dict(os.environ, **env),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip().splitlines()[-2:]


def test_mita_kernel_compile_failure_is_a_warning(tmp_path):
    """A compiler that fails (here ``false``) leaves a one-line warning and the
    PyTorch paths; nothing is cached."""
    first, second = _build_mita_in_fresh_process(CC='false',
                                                 MMCBSA_KERNEL_DIR=str(tmp_path / 'kernels'))
    assert first.startswith('False 1 MiTA: CPU kernel unavailable') and 'false failed' in first
    assert second == 'torch.Size([1, 17, 32])'
    assert not list((tmp_path / 'kernels').glob('*.so'))


# --------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize('exec_path', ['auto', 'masked', 'dense', 'grouped'])
@pytest.mark.parametrize('variant', [dict(), dict(dwc=True), dict(dwc=True, gate=True),
                                     dict(mode='routed', topk=50)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_mita_cuda_matches_cpu_float32(variant, exec_path, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(7)
    cpu = MiTA(192, 3, path=exec_path, **variant)
    gpu = MiTA(192, 3, path=exec_path, **variant).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(2, 1 + 14 * 14, 192)
    cot = torch.randn_like(x)
    xc = x.clone().requires_grad_(True)
    ref = cpu(xc, hw_shape=(14, 14))
    (ref * cot).sum().backward()
    xg = x.cuda().requires_grad_(True)
    amp = (contextlib.nullcontext() if dtype == torch.float32
           else torch.autocast('cuda', dtype=dtype))
    with amp:
        out = gpu(xg, hw_shape=(14, 14))
    (out.float() * cot.cuda()).sum().backward()
    tol = 1e-3 if dtype == torch.float32 else 0.05
    err = (out.float().cpu() - ref.detach()).norm(dim=-1) / ref.detach().norm(dim=-1)
    assert torch.quantile(err.flatten(), 0.99) < tol
    gerr = (xg.grad.float().cpu() - xc.grad).norm(dim=-1) / xc.grad.norm(dim=-1)
    assert torch.quantile(gerr.flatten(), 0.99) < 2 * tol
    for (name, pc), pg in zip(cpu.named_parameters(), gpu.parameters()):
        rel = (pg.grad.float().cpu() - pc.grad).norm() / pc.grad.norm()
        assert rel < 2 * tol, name


@pytest.mark.cuda
@pytest.mark.parametrize('exec_path', ['auto', 'grouped'])
@pytest.mark.parametrize('variant', [dict(), dict(dwc=True, gate=True), dict(mode='routed')])
@pytest.mark.parametrize('hw', [(14, 14), (40, 40)])  # masked: all keys / per-expert tables
def test_mita_cuda_paths_never_synchronise(variant, hw, exec_path):
    """The automatic CUDA path (masked) and the grouped path (a fixed number of expert
    blocks): forward and backward under bf16 autocast without one host synchronisation
    (no .item(), no data-dependent size), equal to the dense path."""
    torch.manual_seed(8)
    attn = MiTA(96, 3, path=exec_path, **variant).cuda()
    dense = MiTA(96, 3, path='dense', **variant).cuda()
    dense.load_state_dict(attn.state_dict())
    x = torch.randn(2, 1 + hw[0] * hw[1], 96, device='cuda', requires_grad=True)
    assert attn.use_masked(x) == (exec_path == 'auto')
    out = attn(x, hw_shape=hw)  # warm-up (lazy initialisations may synchronise once)
    out.sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out = attn(x, hw_shape=hw)
        out.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with torch.no_grad():
        a, b = attn(x, hw_shape=hw), dense(x, hw_shape=hw)
    assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item()


@pytest.mark.cuda
def test_mita_kernel_path_is_cpu_only():
    """path='auto' takes the PyTorch paths on CUDA; path='kernel' says it needs a CPU."""
    attn = MiTA(32, 2, num_landmarks=4, topk=5).cuda()
    x = torch.randn(1, 17, 32, device='cuda')
    assert not attn.use_kernel(x, torch.float32, False)
    assert attn(x, hw_shape=(4, 4)).shape == (1, 17, 32)
    attn.path = 'kernel'
    with pytest.raises(ValueError, match="path='kernel' needs a CPU input"):
        attn(x, hw_shape=(4, 4))


# --------------------------------------------------------------------------- building
def test_mita_defaults_and_registry():
    from mmcbsa.registry import PRETRAIN_MODELS, SEG_MODELS
    attn = SEG_MODELS.build(dict(type='MiTA', embed_dims=48, num_heads=3))
    assert isinstance(attn, MiTA) and isinstance(
        PRETRAIN_MODELS.build(dict(type='MiTA', embed_dims=48, num_heads=3)), MiTA)
    assert attn.landmark_grid == (5, 5) and attn.topk == 25 and attn.dwc is None
    assert attn.mode == 'mixture' and not attn.gate and attn.in_proj is attn.qkv
    out = attn(torch.randn(1, 1 + 14 * 10, 48), hw_shape=(14, 10))
    assert out.shape == (1, 141, 48)
    gated = MiTA(48, 3, dwc=True, gate=True)
    assert gated.qkvg.weight.shape == (192, 48) and not hasattr(gated, 'qkv')


def test_mita_build_and_runtime_errors():
    with pytest.raises(ValueError, match='embed_dims'):
        MiTA(50, 3)
    with pytest.raises(ValueError, match='num_landmarks'):
        MiTA(48, 3, num_landmarks=10)
    with pytest.raises(ValueError, match='num_landmarks'):
        MiTA(48, 3, num_landmarks=(0, 4))
    with pytest.raises(ValueError, match='topk'):
        MiTA(48, 3, topk=0)
    with pytest.raises(ValueError, match='mode'):
        MiTA(48, 3, mode='agent')
    with pytest.raises(ValueError, match='path'):
        MiTA(48, 3, path='sparse')
    with pytest.raises(ValueError, match='dense_max_tokens'):
        MiTA(48, 3, dense_max_tokens=0)
    with pytest.raises(ValueError, match='query_block_size'):
        MiTA(48, 3, query_block_size=0)
    with pytest.raises(ValueError, match='max_blocks_per_call'):
        MiTA(48, 3, max_blocks_per_call=0)
    attn = MiTA(48, 3, num_landmarks=4, topk=20)
    with pytest.raises(ValueError, match='embed_dims=48'):
        attn(torch.randn(1, 17, 32), hw_shape=(4, 4))
    with pytest.raises(ValueError, match='hw_shape'):
        attn(torch.randn(1, 30, 48))
    legacy = MiTA(48, 3, num_landmarks=4, topk=4, legacy_pooling=True)
    with pytest.raises(ValueError, match='legacy_pooling'):
        legacy(torch.randn(1, 2 + 16, 48), hw_shape=(4, 4))  # N - 1 not square


# --------------------------------------------------------------------------- converter
def test_mita_converter_variants():
    with pytest.raises(KeyError, match='qkv.weight'):
        convert_mita_attention({'proj.weight': torch.zeros(1)})
    sd = {'blocks.0.attn.qkv.weight': torch.zeros(6, 2), 'blocks.0.attn.proj.weight':
          torch.zeros(2, 2), 'blocks.0.attn.proj.bias': torch.zeros(2),
          'blocks.0.attn.dwc.weight': torch.zeros(2, 1, 3, 3), 'blocks.0.attn.dwc.bias':
          torch.zeros(2)}
    out = convert_mita_attention(sd, src_prefix='blocks.0.attn.', dst_prefix='attn.')
    assert sorted(out) == ['attn.dwc.bias', 'attn.dwc.weight', 'attn.proj.bias',
                           'attn.proj.weight', 'attn.qkv.weight']
    # +DWC,Gate: ``qkvg`` (q, k, v, g chunks) maps one to one
    torch.manual_seed(8)
    ref = MiTA(24, 2, num_landmarks=25, topk=25, dwc=True, gate=True, qkv_bias=False)
    gated_sd = {f'attn.{k}': v for k, v in ref.state_dict().items()}
    kw = mita_attention(dict(dim=24, num_heads=2), gate=True)
    assert kw['gate'] and kw['dwc'] and kw['topk'] == 25 and kw['num_landmarks'] == (5, 5)
    attn = MiTA(**kw)
    attn.load_state_dict(convert_mita_attention(gated_sd, src_prefix='attn.'), strict=True)
    x = torch.randn(1, 1 + 6 * 6, 24)
    assert torch.equal(attn.qkvg.weight, ref.qkvg.weight)
    with torch.no_grad():
        assert attn(x, hw_shape=(6, 6)).shape == (1, 37, 24)


# --------------------------------------------------------------------------- a guest in the process
def test_denormals_survive_every_module(tmp_path):
    """Building and running (forward and backward, CPU) every attention and every model
    family, the compiled MiTA kernel included, leaves the floating-point environment as
    it was: a subnormal float32 stays subnormal. (Linking the kernel with -ffast-math
    added crtfastmath.o, which switched the whole process to flush-to-zero.)"""
    code = '\n'.join([
        'import sys, torch',
        'sys.path.insert(0, sys.argv[1])',
        'tiny = lambda: (torch.tensor([1e-39]) * 1.0).item()',
        'assert tiny() > 0',
        'from model_cases import ATTENTIONS, FAMILIES, run_attention, run_model',
        'for case in ATTENTIONS:',
        '    x = case.input()',
        '    run_attention(case.build(), x, case.hw, torch.randn(x.shape))',
        'for case in FAMILIES:',
        '    model = case.build().train()',
        '    run_model(model, lambda img: model(img, mode="tensor"), case.images())',
        'from mmcbsa.ops import mita_cpu',
        'print(mita_cpu.loaded(), tiny())'])
    env = dict(os.environ, MMCBSA_KERNEL_DIR=str(tmp_path / 'kernels'),
               PYTHONWARNINGS='ignore')
    res = subprocess.run([sys.executable, '-c', code, str(Path(__file__).parent)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    loaded, tiny = res.stdout.split()[-2:]
    assert loaded == 'True'  # the compiled kernel was built, loaded and run
    assert float(tiny) == pytest.approx(1e-39, rel=1e-6)


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """``mita_cpu._compile`` against a fresh cache under ``tmp_path`` (its own
    ``$TMPDIR`` for the fallback); the module's loaded kernel is left alone."""
    monkeypatch.setenv('MMCBSA_KERNEL_DIR', str(tmp_path / 'cache' / 'kernels'))
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))
    (tmp_path / 'tmp').mkdir()
    return tmp_path


def test_kernel_cache_is_private_and_refuses_what_is_not(kernel_cache, monkeypatch):
    root = kernel_cache / 'cache' / 'kernels'
    mita_cpu._compile()
    lib = next(root.glob('*.so'))
    assert stat.S_IMODE(root.stat().st_mode) == 0o700  # created private
    assert stat.S_IMODE(lib.stat().st_mode) == 0o600
    mita_cpu._compile()  # ours: reused
    lib.chmod(0o666)  # a library others could have replaced
    with pytest.raises(mita_cpu.UnsafeCache, match='cached kernel .* writable by other users'):
        mita_cpu._compile()
    lib.unlink()
    lib.symlink_to(kernel_cache / 'elsewhere.so')
    with pytest.raises(mita_cpu.UnsafeCache, match='a symbolic link'):
        mita_cpu._compile()
    lib.unlink()
    root.chmod(0o777)  # a world-writable cache directory
    with pytest.raises(mita_cpu.UnsafeCache, match='cache directory .* writable by other'):
        mita_cpu._compile()
    root.chmod(0o700)
    monkeypatch.setattr(mita_cpu, '_uid', lambda: os.getuid() + 1)  # someone else's
    with pytest.raises(mita_cpu.UnsafeCache, match=r'belongs to uid \d+, not to this user'):
        mita_cpu._compile()


def test_kernel_cache_fallback_directory(kernel_cache, monkeypatch):
    """An unusable cache directory falls back to $TMPDIR/mmcbsa-kernels-<uid>, created
    0700; a fallback directory that someone else made (a planted name) is refused."""
    (kernel_cache / 'cache').write_text('a file, not a directory')  # makedirs fails
    mita_cpu._compile()
    fallback = kernel_cache / 'tmp' / f'mmcbsa-kernels-{os.getuid()}'
    assert stat.S_IMODE(fallback.stat().st_mode) == 0o700 and list(fallback.glob('*.so'))
    monkeypatch.setattr(mita_cpu, '_uid', lambda: os.getuid() + 1)
    planted = kernel_cache / 'tmp' / f'mmcbsa-kernels-{os.getuid() + 1}'
    planted.mkdir(mode=0o755)
    with pytest.raises(mita_cpu.UnsafeCache, match='belongs to uid'):
        mita_cpu._compile()


def test_refused_cache_is_one_warning_and_the_pytorch_paths(tmp_path):
    """End to end in a fresh process: a world-writable $MMCBSA_KERNEL_DIR -> one warning
    naming it, no kernel, MiTA still computes (PyTorch paths)."""
    root = tmp_path / 'kernels'
    root.mkdir()
    root.chmod(0o777)
    first, second = _build_mita_in_fresh_process(MMCBSA_KERNEL_DIR=str(root))
    assert first.startswith('False 1 MiTA: CPU kernel unavailable (refused the kernel cache '
                            f'directory {root}: writable by other users (mode 0o777))')
    assert second == 'torch.Size([1, 17, 32])'
    assert not list(root.glob('*.so'))
