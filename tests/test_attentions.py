"""Attention family (docs/mechanisms.md §1, §2): CBSA, MSSA, TSSA, MHSA, plus ISTA and
WhiteBoxBlock.

* parity with the reference fixtures (through mmcbsa.converters),
* hand-written references IN this file (explicit loops over batch and heads, plain
  torch ops from the formulas of docs/mechanisms.md; none of mmcbsa's code),
* gradients (fp32, bf16 autocast, float64 gradcheck), registry builds, config errors.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import fixture_params, load_fixture
from reference_configs import white_box_attention
from mmpretrain.registry import MODELS as PRETRAIN_MODELS
from mmseg.registry import MODELS as SEG_MODELS
from torch.func import functional_call

import mmcbsa  # noqa: F401
from mmcbsa.converters import convert_attention

ATTENTIONS = ('CBSA', 'MSSA', 'TSSA', 'MHSA')


def build(cfg, registry=SEG_MODELS):
    return registry.build(cfg)


# ----------------------------------------------------------------------------------------
# hand-written references (docs/mechanisms.md formulas, loops over batch and heads)
# ----------------------------------------------------------------------------------------
def ref_adaptive_pool(img, out_hw):
    """img (h, w, C) -> (s_h * s_w, C): mean over PyTorch's adaptive windows
    [floor(i*h/s), ceil((i+1)*h/s))."""
    h, w, _ = img.shape
    sh, sw = out_hw
    rows = []
    for i in range(sh):
        h0, h1 = (i * h) // sh, -(-((i + 1) * h) // sh)
        for j in range(sw):
            w0, w1 = (j * w) // sw, -(-((j + 1) * w) // sw)
            rows.append(img[h0:h1, w0:w1].reshape(-1, img.shape[-1]).mean(0))
    return torch.stack(rows)


def ref_cbsa(x, U, step_rep, step_x, Wo, bo, heads, hw, grid, legacy=False, reps=None):
    """docs/mechanisms.md §1 steps 1-6, one (batch, head) at a time."""
    B, N, _ = x.shape
    p = U.shape[0] // heads
    w = x @ U.T  # (B, N, Hp)
    out = torch.zeros_like(w)
    for b in range(B):
        if reps is not None:
            r0_all = reps
        elif legacy:  # first N-1 tokens in sequence order on a floor(sqrt(N)) square
            side = math.isqrt(N)
            r0_all = ref_adaptive_pool(w[b, :N - 1].reshape(side, side, -1), grid)
        else:  # patch tokens only, on their h x w grid
            h, wd = hw
            r0_all = ref_adaptive_pool(w[b, N - h * wd:].reshape(h, wd, -1), grid)
        for hd in range(heads):
            sl = slice(hd * p, (hd + 1) * p)
            wh, r0 = w[b, :, sl], r0_all[:, sl]
            A = torch.softmax(r0 @ wh.T / math.sqrt(p), dim=1)  # (m, N), over tokens
            R = r0 + step_rep[hd] * (A @ wh)
            delta = torch.softmax(R @ R.T / math.sqrt(p), dim=1) @ R
            out[b, :, sl] = step_x[hd] * (A.T @ delta)
    return out @ Wo.T + (0 if bo is None else bo)


def ref_mssa_heads(q_src, kv_src, U, heads):
    """concat_h softmax(q_h k_hᵀ/√p) k_h with q = q_src Uᵀ, k = v = kv_src Uᵀ."""
    B = q_src.shape[0]
    p = U.shape[0] // heads
    q, k = q_src @ U.T, kv_src @ U.T
    out = torch.zeros_like(q)
    for b in range(B):
        for hd in range(heads):
            sl = slice(hd * p, (hd + 1) * p)
            a = torch.softmax(q[b, :, sl] @ k[b, :, sl].T / math.sqrt(p), dim=1)
            out[b, :, sl] = a @ k[b, :, sl]
    return out


def ref_tssa(x, W, temp, Wo, bo, heads):
    B, N, _ = x.shape
    p = W.shape[0] // heads
    w = x @ W.T
    out = torch.zeros_like(w)
    for b in range(B):
        # score[n, h] = τ_h Σ_p ŵ², ŵ normalised over tokens per channel
        score = torch.zeros(N, heads, dtype=x.dtype)
        for hd in range(heads):
            wh = w[b, :, hd * p:(hd + 1) * p]
            w_hat = wh / wh.norm(dim=0, keepdim=True)
            score[:, hd] = temp[hd] * (w_hat ** 2).sum(1)
        pi = torch.softmax(score, dim=1)  # over heads
        for hd in range(heads):
            wh = w[b, :, hd * p:(hd + 1) * p]
            weights = pi[:, hd] / (pi[:, hd].sum() + 1e-8)
            s = weights @ (wh * wh)  # (p,)
            out[b, :, hd * p:(hd + 1) * p] = -(wh * pi[:, hd:hd + 1]) / (1 + s)
    return out @ Wo.T + bo


def ref_mhsa(x, Wqkv, bqkv, Wo, bo, heads):
    B, N, C = x.shape
    p = C // heads
    qkv = x @ Wqkv.T + bqkv
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    out = torch.zeros_like(q)
    for b in range(B):
        for hd in range(heads):
            sl = slice(hd * p, (hd + 1) * p)
            a = torch.softmax(q[b, :, sl] @ k[b, :, sl].T / math.sqrt(p), dim=1)
            out[b, :, sl] = a @ v[b, :, sl]
    return out @ Wo.T + bo


def randomize(module, seed=0):
    """Non-trivial values for every parameter (biases, step sizes, temperatures)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return module


def square_hw(n_tokens, prefix=1):
    side = math.isqrt(n_tokens - prefix)
    assert side * side == n_tokens - prefix, f'{n_tokens} tokens are not [CLS; square grid]'
    return side, side


# ----------------------------------------------------------------------------------------
# parity with the reference fixtures
# ----------------------------------------------------------------------------------------
def _parity(kind, path):
    fx = load_fixture(path)
    cfg = white_box_attention(kind, fx['config'])
    model = build(cfg).eval()
    model.load_state_dict(convert_attention(kind, fx['state_dict']))
    x = fx['input']
    with torch.no_grad():
        y = model(x, hw_shape=square_hw(x.shape[1]))
    assert y.shape == fx['output'].shape
    err = (y - fx['output']).abs().max().item()
    assert err <= 1e-4, f'{path.name}: max abs err {err}'


@pytest.mark.parametrize('path', fixture_params('cbsa_attention'))
def test_cbsa_fixture_parity(path):
    _parity('cbsa', path)


@pytest.mark.parametrize('path', fixture_params('mssa_attention'))
def test_mssa_fixture_parity(path):
    _parity('mssa', path)


@pytest.mark.parametrize('path', fixture_params('tssa_attention'))
def test_tssa_fixture_parity(path):
    _parity('tssa', path)


# ----------------------------------------------------------------------------------------
# CBSA against the hand reference
# ----------------------------------------------------------------------------------------
CBSA_CASES = [
    # (id, batch, prefix, hw, kwargs)
    ('square-cls', 2, 1, (4, 4), dict(num_reps=4)),
    ('no-prefix', 2, 0, (4, 4), dict(num_reps=4)),
    ('four-prefix', 2, 4, (4, 4), dict(num_reps=(2, 2))),
    ('nonsquare-3x5-reps-2x3', 2, 1, (3, 5), dict(num_reps=(2, 3))),
    ('uneven-windows-5x7-reps-3x4', 1, 2, (5, 7), dict(num_reps=(3, 4))),
    ('n-below-m-2x2-reps-8x8', 2, 1, (2, 2), dict(num_reps=64)),
    ('batch-1', 1, 1, (6, 6), dict(num_reps=9)),
    ('head-dims-differ', 2, 1, (4, 4), dict(num_reps=4, head_dims=5)),
    ('no-proj-bias', 2, 1, (4, 4), dict(num_reps=4, proj_bias=False)),
]


@pytest.mark.parametrize('batch,prefix,hw,kwargs', [c[1:] for c in CBSA_CASES],
                         ids=[c[0] for c in CBSA_CASES])
def test_cbsa_matches_hand_reference(batch, prefix, hw, kwargs):
    heads, C = 2, 12
    model = randomize(build(dict(type='CBSA', embed_dims=C, num_heads=heads, **kwargs)).double())
    n = prefix + hw[0] * hw[1]
    x = torch.randn(batch, n, C, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = model(x, hw_shape=hw)
    ref = ref_cbsa(x, model.in_proj.weight, model.step_rep, model.step_x, model.out_proj.weight,
                   model.out_proj.bias, heads, hw, model.rep_grid)
    assert y.shape == (batch, n, C)
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-9)


def test_cbsa_prefix_tokens_are_not_pooled():
    """Default pooling reads the patch tokens only: with a large CLS token the module
    still equals the patch-only reference, and differs from pooling that takes the
    CLS token in (the reference's legacy accident, first N-1 tokens)."""
    heads, C, hw = 2, 8, (4, 4)
    model = randomize(build(dict(type='CBSA', embed_dims=C, num_heads=heads,
                                 num_reps=4)).double())
    x = torch.randn(1, 17, C, dtype=torch.float64)
    x[:, 0] += 5.0
    args = (model.in_proj.weight, model.step_rep, model.step_x, model.out_proj.weight,
            model.out_proj.bias, heads)
    y = model(x, hw_shape=hw)
    torch.testing.assert_close(y, ref_cbsa(x, *args, hw, (2, 2)), atol=1e-10, rtol=1e-9)
    assert (y - ref_cbsa(x, *args, None, (2, 2), legacy=True)).abs().max() > 1e-3


def test_cbsa_legacy_pooling_matches_hand_reference():
    """Legacy: pool w[:, :N-1] (CLS included, last patch dropped) on a ⌊√N⌋ square."""
    heads, C = 2, 8
    model = randomize(build(dict(type='CBSA', embed_dims=C, num_heads=heads, num_reps=4,
                                 legacy_pooling=True)).double())
    x = torch.randn(2, 17, C, dtype=torch.float64)
    ref = ref_cbsa(x, model.in_proj.weight, model.step_rep, model.step_x, model.out_proj.weight,
                   model.out_proj.bias, heads, None, (2, 2), legacy=True)
    torch.testing.assert_close(model(x, hw_shape=(4, 4)), ref, atol=1e-10, rtol=1e-9)
    # ... and it differs from the correct (patch-only) pooling
    default = build(dict(type='CBSA', embed_dims=C, num_heads=heads, num_reps=4)).double()
    default.load_state_dict(model.state_dict())
    assert (default(x, hw_shape=(4, 4)) - ref).abs().max() > 1e-6


def test_cbsa_learned_reps_match_hand_reference():
    heads, C, m = 3, 12, 6
    model = randomize(build(dict(type='CBSA', embed_dims=C, num_heads=heads, num_reps=(2, 3),
                                 rep_mode='learned')).double())
    assert model.reps.shape == (m, C)
    x = torch.randn(2, 11, C, dtype=torch.float64)
    ref = ref_cbsa(x, model.in_proj.weight, model.step_rep, model.step_x, model.out_proj.weight,
                   model.out_proj.bias, heads, None, None, reps=model.reps)
    # learned representatives need no patch grid
    torch.testing.assert_close(model(x), ref, atol=1e-10, rtol=1e-9)


def test_cbsa_with_tokens_as_representatives_contains_mssa():
    """docs/mechanisms.md §1 unification, made precise: with m = N representatives equal to the
    tokens (R0 = w) and α_rep = 0, the contraction is MSSA's attention
    (Δ_h = softmax(w_h w_hᵀ/√p) w_h = MSSA_h), the extraction matrix is the same
    softmax Q_h, and CBSA's output per head is α_x Q_hᵀ · MSSA_h(w)."""
    heads, C, n = 2, 8, 6
    x = torch.randn(1, n, C, dtype=torch.float64)
    cbsa = build(dict(type='CBSA', embed_dims=C, num_heads=heads, num_reps=(2, 3),
                      rep_mode='learned')).double()
    mssa = build(dict(type='MSSA', embed_dims=C, num_heads=heads)).double()
    randomize(cbsa)
    eye = torch.eye(C, dtype=torch.float64)
    with torch.no_grad():
        mssa.in_proj.weight.copy_(cbsa.in_proj.weight)
        for m in (cbsa, mssa):  # identity output projections expose the head outputs
            m.out_proj.weight.copy_(eye)
            m.out_proj.bias.zero_()
        cbsa.reps.copy_(x[0] @ cbsa.in_proj.weight.T)  # R0 = w
        cbsa.step_rep.zero_()
        cbsa.step_x.copy_(torch.tensor([0.7, -1.3]))
    y_cbsa, y_mssa = cbsa(x), mssa(x)
    w, p = x[0] @ cbsa.in_proj.weight.T, C // heads
    for hd in range(heads):
        sl = slice(hd * p, (hd + 1) * p)
        q = torch.softmax(w[:, sl] @ w[:, sl].T / math.sqrt(p), dim=1)
        torch.testing.assert_close(y_mssa[0, :, sl], q @ w[:, sl])
        torch.testing.assert_close(y_cbsa[0, :, sl], cbsa.step_x[hd] * q.T @ y_mssa[0, :, sl])


# ----------------------------------------------------------------------------------------
# MSSA / TSSA / MHSA against hand references
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('head_dims', [None, 5])
def test_mssa_linear_matches_hand_reference(head_dims):
    heads, C = 2, 8
    model = randomize(build(dict(type='MSSA', embed_dims=C, num_heads=heads,
                                 head_dims=head_dims)).double())
    x = torch.randn(2, 7, C, dtype=torch.float64)
    o = ref_mssa_heads(x, x, model.in_proj.weight, heads)
    ref = o @ model.out_proj.weight.T + model.out_proj.bias
    torch.testing.assert_close(model(x, hw_shape=(2, 3)), ref, atol=1e-10, rtol=1e-9)


def test_mssa_tied_and_cross_attention_match_hand_reference():
    """DEPICT form (docs/mechanisms.md §3): y = γ · concat_h(o_h) U; cross: q = x Uᵀ,
    k = v = ctx Uᵀ."""
    heads, C = 3, 9
    model = randomize(build(dict(type='MSSA', embed_dims=C, num_heads=heads, head_dims=4,
                                 out_proj='tied')).double())
    assert not hasattr(model, 'out_proj') or not isinstance(model.out_proj, torch.nn.Module)
    U, gamma = model.in_proj.weight, model.step_size
    x = torch.randn(2, 5, C, dtype=torch.float64)
    ctx = torch.randn(2, 11, C, dtype=torch.float64)
    torch.testing.assert_close(model(x), gamma * ref_mssa_heads(x, x, U, heads) @ U,
                               atol=1e-10, rtol=1e-9)
    y = model(x, context=ctx)
    assert y.shape == x.shape
    torch.testing.assert_close(y, gamma * ref_mssa_heads(x, ctx, U, heads) @ U,
                               atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize('batch,n', [(1, 5), (2, 10)])
def test_tssa_matches_hand_reference(batch, n):
    heads, C = 3, 12
    model = randomize(build(dict(type='TSSA', embed_dims=C, num_heads=heads)).double())
    x = torch.randn(batch, n, C, dtype=torch.float64)
    ref = ref_tssa(x, model.in_proj.weight, model.temp, model.out_proj.weight,
                   model.out_proj.bias, heads)
    torch.testing.assert_close(model(x), ref, atol=1e-10, rtol=1e-9)


def test_mhsa_matches_hand_reference():
    heads, C = 2, 8
    model = randomize(build(dict(type='MHSA', embed_dims=C, num_heads=heads)).double())
    x = torch.randn(2, 6, C, dtype=torch.float64)
    ref = ref_mhsa(x, model.qkv.weight, model.qkv.bias, model.proj.weight, model.proj.bias,
                   heads)
    torch.testing.assert_close(model(x), ref, atol=1e-10, rtol=1e-9)


# ----------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------
GRAD_CFGS = [
    ('CBSA', dict(num_reps=4)),
    ('CBSA', dict(num_reps=(2, 3), rep_mode='learned')),
    ('MSSA', dict()),
    ('MSSA', dict(out_proj='tied')),
    ('TSSA', dict()),
    ('MHSA', dict()),
]


def _grad_id(c):
    return c[0] + ''.join(f'-{k}={v}' for k, v in c[1].items())


@pytest.mark.parametrize('name,kwargs', GRAD_CFGS, ids=[_grad_id(c) for c in GRAD_CFGS])
@pytest.mark.parametrize('autocast', [False, True], ids=['fp32', 'bf16-autocast'])
def test_gradients_finite(name, kwargs, autocast):
    torch.manual_seed(0)
    model = build(dict(type=name, embed_dims=32, num_heads=4, **kwargs))
    x = torch.randn(2, 1 + 36, 32, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        y = model(x, hw_shape=(6, 6))
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    (y.float() * torch.randn(y.shape)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.dtype == p.dtype
    if autocast:  # bf16 result is a rounding of the fp32 one
        with torch.no_grad():
            y32 = model(x, hw_shape=(6, 6))
        assert (y.float() - y32).abs().max() <= 0.05 * y32.abs().max() + 1e-3


GRADCHECK_CFGS = [
    ('CBSA', dict(num_reps=(2, 3)), 2, (3, 5)),  # 2 prefix tokens, non-square
    ('CBSA', dict(num_reps=9), 1, (2, 2)),  # N below m
    ('CBSA', dict(num_reps=4, legacy_pooling=True), 1, (3, 3)),
    ('CBSA', dict(num_reps=(1, 3), rep_mode='learned'), 1, (2, 2)),
    ('MSSA', dict(), 1, (2, 2)),
    ('MSSA', dict(out_proj='tied', head_dims=3), 1, (2, 2)),
    ('TSSA', dict(), 1, (2, 2)),
]


@pytest.mark.parametrize('name,kwargs,prefix,hw', GRADCHECK_CFGS,
                         ids=[_grad_id(c) for c in GRADCHECK_CFGS])
def test_gradcheck_float64(name, kwargs, prefix, hw):
    torch.manual_seed(0)
    model = randomize(build(dict(type=name, embed_dims=6, num_heads=2, **kwargs)).double())
    x = torch.randn(2, prefix + hw[0] * hw[1], 6, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())

    def fn(inp, *ps):
        return functional_call(model, dict(zip(names, ps)), (inp, ), dict(hw_shape=hw))

    assert torch.autograd.gradcheck(fn, (x, ) + params, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_mssa_cross_attention_gradcheck():
    torch.manual_seed(0)
    model = randomize(build(dict(type='MSSA', embed_dims=6, num_heads=2,
                                 out_proj='tied')).double())
    x = torch.randn(1, 3, 6, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(1, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: model(a, context=b), (x, ctx))


# ----------------------------------------------------------------------------------------
# registries and published defaults
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('registry', [SEG_MODELS, PRETRAIN_MODELS], ids=['mmseg', 'mmpretrain'])
@pytest.mark.parametrize('name', ATTENTIONS)
def test_bare_config_builds_in_both_registries(registry, name):
    model = registry.build(dict(type=name, embed_dims=48, num_heads=3))
    assert type(model).__name__ == name
    assert model.head_dims == 16
    x = torch.randn(2, 1 + 64, 48)
    assert model(x, hw_shape=(8, 8)).shape == x.shape
    if name == 'CBSA':  # published default: 8×8 pooled representatives, correct pooling
        assert model.rep_grid == (8, 8) and model.num_reps == 64
        assert model.rep_mode == 'pool' and not model.legacy_pooling
        assert model.step_rep.shape == model.step_x.shape == (3, )
    if name == 'MSSA':
        assert model.out_proj_mode == 'linear'
    if name == 'TSSA':
        assert torch.equal(model.temp.detach(), torch.ones(3))


# ----------------------------------------------------------------------------------------
# impossible configs: clear errors naming the parameter
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ATTENTIONS)
def test_embed_dims_not_divisible(name):
    with pytest.raises(ValueError, match=r'embed_dims \(10\).*num_heads \(3\)'):
        build(dict(type=name, embed_dims=10, num_heads=3))


@pytest.mark.parametrize('name', ATTENTIONS)
@pytest.mark.parametrize('bad', [0, -2])
def test_non_positive_num_heads(name, bad):
    with pytest.raises(ValueError, match='num_heads'):
        build(dict(type=name, embed_dims=12, num_heads=bad))


@pytest.mark.parametrize('name', ['CBSA', 'MSSA', 'TSSA'])
@pytest.mark.parametrize('bad', [0, -4])
def test_non_positive_head_dims(name, bad):
    with pytest.raises(ValueError, match='head_dims'):
        build(dict(type=name, embed_dims=12, num_heads=3, head_dims=bad))


@pytest.mark.parametrize('bad', [0, -4, (0, 4), (2, -1), (2, 2, 2)])
def test_cbsa_bad_num_reps(bad):
    with pytest.raises(ValueError, match='num_reps'):
        build(dict(type='CBSA', embed_dims=12, num_heads=3, num_reps=bad))


@pytest.mark.parametrize('bad', [10, 63])
def test_cbsa_non_square_int_num_reps(bad):
    with pytest.raises(ValueError, match=rf'num_reps={bad} is not a perfect square'):
        build(dict(type='CBSA', embed_dims=12, num_heads=3, num_reps=bad))


def test_cbsa_bad_rep_mode():
    with pytest.raises(ValueError, match='rep_mode'):
        build(dict(type='CBSA', embed_dims=12, num_heads=3, rep_mode='agents'))
    with pytest.raises(ValueError, match='legacy_pooling'):
        build(dict(type='CBSA', embed_dims=12, num_heads=3, rep_mode='learned',
                   legacy_pooling=True))


def test_mssa_bad_out_proj():
    with pytest.raises(ValueError, match='out_proj'):
        build(dict(type='MSSA', embed_dims=12, num_heads=3, out_proj='shared'))


def test_cbsa_hw_shape_errors():
    model = build(dict(type='CBSA', embed_dims=12, num_heads=3, num_reps=4))
    x = torch.randn(1, 10, 12)
    with pytest.raises(ValueError, match=r'hw_shape=\(4, 4\).*N=10'):
        model(x, hw_shape=(4, 4))
    with pytest.raises(ValueError, match='hw_shape'):
        model(x)
    with pytest.raises(ValueError, match='hw_shape'):
        model(x, hw_shape=(0, 3))
    legacy = build(dict(type='CBSA', embed_dims=12, num_heads=3, num_reps=4,
                        legacy_pooling=True))
    with pytest.raises(ValueError, match='legacy_pooling'):
        legacy(torch.randn(1, 11, 12), hw_shape=(2, 5))


# ----------------------------------------------------------------------------------------
# ISTA and WhiteBoxBlock
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('step_size,lambd', [(0.1, 0.1), (0.5, 0.02)])
def test_ista_matches_hand_formula(step_size, lambd):
    """ISTA(u) = ReLU(u + η(u D − u Dᵀ D) − η λ), row vectors."""
    ista = build(dict(type='ISTA', embed_dims=7, step_size=step_size, lambd=lambd)).double()
    u = torch.randn(3, 5, 7, dtype=torch.float64)
    D = ista.weight
    ref = torch.zeros_like(u)
    for b in range(3):
        for n in range(5):
            row = u[b, n]
            ref[b, n] = torch.clamp(row + step_size * (row @ D - row @ D.T @ D)
                                    - step_size * lambd, min=0)
    torch.testing.assert_close(ista(u), ref, atol=1e-12, rtol=1e-10)
    assert (ista(u) == 0).any() and (ista(u) > 0).any()


def _layer_norm(x, norm):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def test_block_ista_layout_matches_hand_composition():
    block = randomize(build(dict(type='WhiteBoxBlock', embed_dims=12, num_heads=3,
                                 attn_cfg=dict(type='CBSA', num_reps=4))).double())
    x = torch.randn(2, 17, 12, dtype=torch.float64)
    a = block.attn
    z = x + ref_cbsa(_layer_norm(x, block.norm1), a.in_proj.weight, a.step_rep, a.step_x,
                     a.out_proj.weight, a.out_proj.bias, 3, (4, 4), (2, 2))
    u = _layer_norm(z, block.norm2)
    D = block.ffn.weight
    ref = torch.relu(u + 0.1 * (u @ D - u @ D.T @ D) - 0.1 * 0.1)  # no residual around ISTA
    torch.testing.assert_close(block(x, hw_shape=(4, 4)), ref, atol=1e-10, rtol=1e-9)


def test_block_residual_layout_matches_hand_composition():
    block = randomize(build(dict(
        type='WhiteBoxBlock', embed_dims=12, num_heads=3, layout='residual',
        attn_cfg=dict(type='MHSA'),
        ffn_cfg=dict(type='FFN', feedforward_channels=20, act_cfg=dict(type='GELU')))).double())
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    at = block.attn
    x1 = x + ref_mhsa(_layer_norm(x, block.norm1), at.qkv.weight, at.qkv.bias, at.proj.weight,
                      at.proj.bias, 3)
    fc1, fc2 = [m for m in block.ffn.modules() if isinstance(m, torch.nn.Linear)]
    assert (fc1.in_features, fc1.out_features, fc2.out_features) == (12, 20, 12)
    h = F.gelu(_layer_norm(x1, block.norm2) @ fc1.weight.T + fc1.bias)
    ref = x1 + (h @ fc2.weight.T + fc2.bias)  # exactly one residual around the FFN
    torch.testing.assert_close(block(x, hw_shape=(2, 4)), ref, atol=1e-10, rtol=1e-9)


def _block_attention_names():
    names = list(ATTENTIONS)
    names += [n for n in ('MiTA', 'PrimalAttention') if SEG_MODELS.get(n) is not None]
    return names


@pytest.mark.parametrize('registry', [SEG_MODELS, PRETRAIN_MODELS], ids=['mmseg', 'mmpretrain'])
@pytest.mark.parametrize('name', _block_attention_names())
def test_block_swaps_attention_with_one_key(registry, name):
    block = registry.build(dict(type='WhiteBoxBlock', embed_dims=24, num_heads=3,
                                attn_cfg=dict(type=name)))
    assert type(block.attn).__name__ == name
    assert block.attn.embed_dims == 24 and block.attn.num_heads == 3
    block.eval()
    x = torch.randn(2, 1 + 64, 24)
    y = block(x, hw_shape=(8, 8))
    assert y.shape == x.shape
    # the block is exactly ISTA(LN2(x + attn(LN1(x)))) around whatever attention it holds
    with torch.no_grad():
        z = x + block.attn(block.norm1(x), hw_shape=(8, 8))
        torch.testing.assert_close(y, block.ffn(block.norm2(z)))


class _WithGrid(torch.nn.Module):
    def __init__(self, attn, hw):
        super().__init__()
        self.attn, self.hw = attn, hw

    def forward(self, x):
        return self.attn(x, hw_shape=self.hw)


@pytest.mark.parametrize('kwargs', [dict(num_reps=(2, 3)), dict(num_reps=4, rep_mode='learned')],
                         ids=['pool', 'learned'])
def test_cbsa_traced_path_equals_hand_written_backward(kwargs):
    """CBSA runs its hand-written backward in eager training and plain ops when traced
    (FLOP counters, export) or without autograd: same values, same gradients."""
    model = randomize(build(dict(type='CBSA', embed_dims=8, num_heads=2, **kwargs)).double())
    x = torch.randn(2, 17, 8, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 17, 8, dtype=torch.float64)
    y = model(x, hw_shape=(4, 4))
    grads = torch.autograd.grad(y, [x] + list(model.parameters()), gy)
    with torch.no_grad():
        torch.testing.assert_close(model(x, hw_shape=(4, 4)), y, atol=1e-12, rtol=1e-12)
    traced = torch.jit.trace(_WithGrid(model, (4, 4)), (x.detach(), ), check_trace=False)
    y_traced = traced(x)
    torch.testing.assert_close(y_traced, y, atol=1e-12, rtol=1e-12)
    grads_traced = torch.autograd.grad(y_traced, [x] + list(model.parameters()), gy)
    for a, b in zip(grads, grads_traced):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_cbsa_flops_are_counted():
    """mmengine's jit FLOP counter sees every product of CBSA (docs/mechanisms.md §1 cost)."""
    from mmengine.analysis import FlopAnalyzer
    c, heads, m, side = 48, 3, 16, 8
    n, p = 1 + side * side, c // heads
    model = build(dict(type='CBSA', embed_dims=c, num_heads=heads, num_reps=m)).eval()
    analyzer = FlopAnalyzer(_WithGrid(model, (side, side)), (torch.randn(1, n, c), ))
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    expected = (2 * n * c * c  # in / out projections
                + 3 * heads * m * p * n + 2 * heads * m * m * p  # extract, broadcast, contract
                + c * side * side)  # adaptive average pooling, 1 per input element
    assert analyzer.total() == expected
