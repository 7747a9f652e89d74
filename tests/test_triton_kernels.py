"""CBSA's Triton kernels (mmcbsa/ops/cbsa_triton.py) against the PyTorch reference path.

Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1`` before Triton is imported); with one they run compiled on CUDA
(the ``cuda``-marked tests; test_cuda.py also runs CBSA on CUDA through its automatic
path, which is these kernels). Checked: values and all four gradients against a
float64 reference (the module's own PyTorch core, and a hand-written case with one
representative), several token splits, sizes that are not powers of two (the decoder's
``m = p = 100``), shared learned representatives, half precisions, the module's path
switch and its refusals.
"""
import copy
import math

import pytest
import torch

from mmcbsa.models.attentions.cbsa import CBSA, _contract_broadcast, _per_group
from mmcbsa.ops import cbsa_triton

pytestmark = pytest.mark.skipif(
    not cbsa_triton.available() or not (torch.cuda.is_available()
                                        or cbsa_triton.interpreting()),
    reason='needs Triton (with a CUDA device, or TRITON_INTERPRET=1 set before import)')

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


def reference(w, r0, step_rep, step_x, heads):
    """The module's PyTorch core (channels-first heads) on token-major inputs."""
    b, n, c = w.shape
    p, m = c // heads, r0.shape[1]
    g = b * heads
    w_t = w.view(b, n, heads, p).permute(0, 2, 3, 1).reshape(g, p, n)
    r_t = r0.reshape(b, m, heads, p).permute(0, 2, 3, 1).reshape(g, p, m)
    o_t = _contract_broadcast(w_t, r_t, _per_group(step_rep, g), _per_group(step_x, g),
                              p ** -0.5)[0]
    return o_t.view(b, heads, p, n).permute(0, 3, 1, 2).reshape(b, n, c)


def _inputs(b, n, heads, p, m, seed=0, learned=False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(b, n, heads * p, generator=gen, dtype=torch.float64)
    r0 = torch.randn(m if learned else b, *(() if learned else (m, )), heads * p,
                     generator=gen, dtype=torch.float64)
    if learned:
        r0 = r0.view(m, heads * p)
    steps = torch.randn(2, heads, generator=gen, dtype=torch.float64)
    return w, r0, steps[0], steps[1]


def _grads(fn, tensors, cot):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    return [out] + list(torch.autograd.grad(out, leaves, cot))


def _rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).abs().max()
            / b.double().abs().max().clamp_min(1e-30)).item()


SIZES = {  # name: (B, N, H, p, m)
    'one-split': (2, 37, 3, 16, 9),
    'splits': (1, 300, 2, 20, 25),  # several token splits per group, merged by log-sum-exp
    'decoder-100': (2, 70, 1, 100, 100),  # CBT head: p = m = 100 (padded to 128)
    'wide-batch': (3, 5, 2, 64, 4),  # fewer tokens than representatives' rows
}


@pytest.mark.parametrize('name', sorted(SIZES))
def test_kernels_match_the_pytorch_core_float32(name):
    b, n, heads, p, m = SIZES[name]
    why = cbsa_triton.supported(m, p, torch.float32, torch.device(DEVICE))
    if why is not None:  # float32 above 64 on a GPU: shared memory (half precisions below)
        assert DEVICE == 'cuda' and 'float32' in why
        pytest.skip(why)
    w, r0, sr, sx = _inputs(b, n, heads, p, m)
    cot = torch.randn(b, n, heads * p, generator=torch.Generator().manual_seed(9),
                      dtype=torch.float64)
    expected = _grads(lambda *t: reference(*t, heads), (w, r0, sr, sx), cot)
    got = _grads(lambda *t: cbsa_triton.contract_broadcast(*t, heads),
                 [t.float().to(DEVICE) for t in (w, r0, sr, sx)], cot.float().to(DEVICE))
    for what, a, e in zip(('out', 'w', 'r0', 'step_rep', 'step_x'), got, expected):
        assert a.shape == e.shape and a.dtype == torch.float32, what
        assert _rel(a, e) <= 1e-4, (what, _rel(a, e))


def test_kernels_one_representative_by_hand():
    """m = 1: ``A = softmax_n(s r0·w_n)``, ``R = r0 + α_rep Σ A_n w_n``, the contraction
    is the identity (a softmax over one entry), ``o_n = α_x A_n R`` — computed here with
    explicit sums."""
    n, p = 6, 16
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(1, n, p, generator=gen)
    r0 = torch.randn(1, 1, p, generator=gen)
    sr, sx = torch.tensor([0.7]), torch.tensor([-1.3])
    s = 1 / math.sqrt(p)
    logits = [s * float(r0[0, 0] @ w[0, i]) for i in range(n)]
    top = max(logits)
    weights = [math.exp(v - top) for v in logits]
    a = [v / sum(weights) for v in weights]
    reps = r0[0, 0] + 0.7 * sum(a[i] * w[0, i] for i in range(n))
    expected = torch.stack([-1.3 * a[i] * reps for i in range(n)]).unsqueeze(0)
    out = cbsa_triton.contract_broadcast(*(t.to(DEVICE) for t in (w, r0, sr, sx)), 1)
    assert (out.cpu() - expected).abs().max().item() <= 1e-5


def test_kernels_shared_learned_representatives():
    """An expanded ``(m, H·p)`` parameter (stride 0 over the batch): its gradient is the
    sum over the batch, as for the module's learned representatives."""
    b, n, heads, p, m = 3, 50, 2, 16, 16
    w, reps, sr, sx = _inputs(b, n, heads, p, m, learned=True)
    cot = torch.randn(b, n, heads * p, generator=torch.Generator().manual_seed(4),
                      dtype=torch.float64)
    expected = _grads(lambda w, r, a, c: reference(w, r.expand(b, -1, -1), a, c, heads),
                      (w, reps, sr, sx), cot)
    got = _grads(lambda w, r, a, c: cbsa_triton.contract_broadcast(
        w, r.expand(b, -1, -1), a, c, heads),
        [t.float().to(DEVICE) for t in (w, reps, sr, sx)], cot.float().to(DEVICE))
    for a, e in zip(got, expected):
        assert _rel(a, e) <= 1e-4


@pytest.mark.parametrize('size', ['splits', 'decoder-100'])
@pytest.mark.parametrize('dtype,tol', [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_kernels_half_precision(dtype, tol, size):
    """Half-precision inputs (as under autocast): products of half operands, float32
    accumulation and softmax statistics; output and gradients in the input dtype."""
    b, n, heads, p, m = SIZES[size]
    w, r0, sr, sx = _inputs(b, n, heads, p, m, seed=5)
    cot = torch.randn(b, n, heads * p, generator=torch.Generator().manual_seed(6),
                      dtype=torch.float64)
    expected = _grads(lambda *t: reference(*t, heads), (w, r0, sr, sx), cot)
    w_h, r_h = w.to(dtype).to(DEVICE), r0.to(dtype).to(DEVICE)
    got = _grads(lambda w, r, a, c: cbsa_triton.contract_broadcast(w, r, a, c, heads),
                 (w_h, r_h, sr.float().to(DEVICE), sx.float().to(DEVICE)),
                 cot.to(dtype).to(DEVICE))
    assert got[0].dtype == got[1].dtype == got[2].dtype == dtype
    for what, a, e in zip(('out', 'w', 'r0', 'step_rep', 'step_x'), got, expected):
        assert _rel(a, e) <= tol, (what, _rel(a, e))


MODULE_CASES = {  # constructor kwargs, prefix tokens, (h, w)
    'pool': (dict(num_reps=4), 1, (5, 5)),
    'learned': (dict(num_reps=4, rep_mode='learned'), 1, (5, 5)),
    'legacy': (dict(num_reps=4, legacy_pooling=True), 1, (5, 5)),
    'grid-headdims': (dict(num_reps=(2, 3), head_dims=20), 3, (4, 7)),
}


@pytest.mark.parametrize('name', sorted(MODULE_CASES))
def test_module_triton_path_equals_torch_path(name):
    kwargs, npre, hw = MODULE_CASES[name]
    torch.manual_seed(0)
    base = CBSA(48, 3, **kwargs)
    x = torch.randn(2, npre + hw[0] * hw[1], 48)
    results = []
    for path in ('torch', 'triton'):
        attn = copy.deepcopy(base).to(DEVICE)
        attn.path = path
        xi = x.to(DEVICE).requires_grad_(True)
        out = attn(xi, hw_shape=hw)
        (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum().backward()
        results.append([out.detach(), xi.grad] + [p.grad for p in attn.parameters()])
    for a, b in zip(*results):
        assert _rel(b, a) <= 1e-4


def test_module_triton_path_under_bf16_autocast():
    torch.manual_seed(1)
    base = CBSA(64, 2, num_reps=9)
    x = torch.randn(2, 1 + 8 * 8, 64)
    ref = base(x, hw_shape=(8, 8))
    attn = copy.deepcopy(base).to(DEVICE)
    attn.path = 'triton'
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = attn(x.to(DEVICE), hw_shape=(8, 8))
    assert out.dtype == torch.bfloat16
    assert _rel(out, ref) <= 5e-2


def test_module_path_choice_and_refusals():
    attn = CBSA(32, 2, num_reps=4)
    x = torch.randn(1, 17, 32)
    assert attn.path == 'auto' and not attn.use_triton(x, torch.float32)  # CPU: PyTorch
    forced = CBSA(32, 2, num_reps=4, path='triton').double()
    with pytest.raises(ValueError, match=r"path='triton' needs float32, bfloat16 or float16"):
        forced(x.double().to(DEVICE), hw_shape=(4, 4))
    too_many = CBSA(32, 2, num_reps=(12, 12), path='triton').to(DEVICE)
    with pytest.raises(ValueError, match=r'num_reps <= 128'):
        too_many(torch.randn(1, 1 + 12 * 12, 32, device=DEVICE), hw_shape=(12, 12))
    with pytest.raises(ValueError, match="CBSA: path must be one of"):
        CBSA(32, 2, path='fast')


@pytest.mark.cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_kernels_on_cuda_at_config_sizes(dtype):
    """CBT-S's layer (C=384, H=6, m=64, 1024 + 1 tokens) and the CBT head's (p = m = 100,
    1024 + 150 tokens), batch 2: the automatic CUDA path against the PyTorch path on
    the same device, without one host synchronisation."""
    torch.backends.cuda.matmul.allow_tf32 = False
    for kwargs, npre in ((dict(embed_dims=384, num_heads=6, num_reps=64), 1),
                         (dict(embed_dims=384, num_heads=3, head_dims=100, num_reps=100), 150)):
        torch.manual_seed(2)
        fast = CBSA(**kwargs).cuda()
        slow = copy.deepcopy(fast)
        slow.path = 'torch'
        x = torch.randn(2, npre + 32 * 32, 384, device='cuda')
        amp = torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32)
        res = []
        for i, attn in enumerate((slow, fast)):
            xi = x.clone().requires_grad_(True)
            if i:
                torch.cuda.set_sync_debug_mode('error')
            try:
                with amp:
                    out = attn(xi, hw_shape=(32, 32))
                out.float().sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            res.append([out.float(), xi.grad] + [p.grad for p in attn.parameters()])
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        for a, b in zip(*res):
            assert _rel(b, a) <= tol
