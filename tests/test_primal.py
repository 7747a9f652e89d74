"""Primal-Attention (docs/mechanisms.md §6): parity of whole reference classifiers (logits and KSVD
loss) through a timm-like model composed here, a loop reference for the attention and
its KSVD loss at training and other token counts, gradients, dtypes and errors."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import fixture_params, load_fixture
from reference_configs import primal_attention

from mmcbsa.converters import convert_primal_attention
from mmcbsa.models.attentions.primal import PrimalAttention, collect_ksvd_loss


# --------------------------------------------------------------------------- tiny timm ViT
class _SoftmaxAttention(nn.Module):
    """timm ``Attention`` (the non-Primal blocks of Primal.+DeiT)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class _Block(nn.Module):
    """timm pre-norm block; the attention sees ``LN1(X)`` (docs/mechanisms.md §6.2's data)."""

    def __init__(self, dim, attn):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), attn
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.norm1(x)
        x = x + (self.attn(y, hw_shape=None) if isinstance(self.attn, PrimalAttention)
                 else self.attn(y))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class _TinyViT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim, depth, patch = cfg['embed_dim'], cfg['depth'], cfg['patch_size']
        tokens = (cfg['img_size'] // patch) ** 2 + 1
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        first_primal = depth - cfg.get('num_ksvd_layer', depth)
        self.blocks = nn.ModuleList([
            _Block(dim, PrimalAttention(**primal_attention(cfg, layer=i))
                   if i >= first_primal else _SoftmaxAttention(dim, cfg['num_heads']))
            for i in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, cfg['num_classes'])

    def forward(self, img):
        x = self.patch_embed.proj(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


@pytest.mark.parametrize('path', fixture_params('primal'))
def test_primal_classifiers_match_reference_fixture(path):
    fx = load_fixture(path)
    model = _TinyViT(fx['config']).eval()
    sd = fx['state_dict']
    blocks = tuple(k[:-len('we')] for k in sd if k.endswith('.attn.we'))
    renamed = {k: v for k, v in sd.items() if not k.startswith(blocks)}
    for b in blocks:  # the Primal blocks through the module converter
        renamed.update(convert_primal_attention(sd, b, b))
    model.load_state_dict(renamed, strict=True)
    with torch.no_grad():
        logits = model(fx['input'])
    assert (logits - fx['output']).abs().max().item() <= 1e-4
    loss = collect_ksvd_loss(model)
    assert loss.shape == () and abs(loss.item() - fx['ksvd_loss'].item()) <= 1e-4


# --------------------------------------------------------------------------- loop reference
def reference_primal(x, sd, heads, num_samples):
    """docs/mechanisms.md §6 head by head with explicit loops; returns (output, ksvd loss)."""
    b, n, c = x.shape
    p = c // heads
    # positions of docs/mechanisms.md §6.2
    idx = torch.linspace(0, n - 1, num_samples, dtype=torch.int64)
    qk = x @ sd['qk.weight'].T + sd['qk.bias']
    outs, le, lr, count = [], 0., 0., 0
    for bi in range(b):
        per_head = []
        for h in range(heads):
            sl = slice(h * p, (h + 1) * p)
            q = qk[bi, :, sl]
            k = qk[bi, :, c + h * p:c + (h + 1) * p]
            q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            xs = torch.stack([x[bi, int(j), sl] for j in idx])  # (n, p)
            w_e, w_r = xs.T @ sd['w_e'][h], xs.T @ sd['w_r'][h]  # (p, s)
            e, r = q @ w_e, k @ w_r  # (N, s)
            per_head.append(torch.cat([e, r], -1) @ sd['concat_proj.weight'].T
                            + sd['concat_proj.bias'])
            for t in range(n):
                le = le + ((e[t] * sd['lambdas'][h]) ** 2).sum() / 2
                lr = lr + ((r[t] * sd['lambdas'][h]) ** 2).sum() / 2
                count += 1
        outs.append(torch.cat(per_head, -1))
    out = torch.stack(outs) @ sd['proj.weight'].T + sd['proj.bias']
    trace = sum(torch.trace(sd['w_e'][h].T @ sd['w_r'][h]) for h in range(heads)) / heads
    return out, (le / count + lr / count - trace) ** 2


@pytest.mark.parametrize('train_tokens,low_rank,rank_multi,runtime_tokens', [
    (17, 4, 2, 17),   # training size, n = 8 sampled positions
    (17, 4, 2, 50),   # larger input than at training
    (17, 4, 2, 5),    # fewer tokens than samples: positions repeat
    (10, 4, 3, 10),   # n = N_train = 10: every token
    (10, 4, 3, 37),   # the reference would crash here (docs/mechanisms.md §6 accident)
])
def test_primal_matches_loop_reference(train_tokens, low_rank, rank_multi, runtime_tokens):
    torch.manual_seed(0)
    attn = PrimalAttention(12, 3, low_rank=low_rank, rank_multi=rank_multi,
                           num_tokens_train=train_tokens).double()
    assert attn.num_samples == min(train_tokens, low_rank * rank_multi)
    with torch.no_grad():
        for prm in attn.parameters():
            prm.normal_(0, 0.5)
    x = torch.randn(2, runtime_tokens, 12, dtype=torch.double, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    sd = {k: v.detach().clone().requires_grad_(True) for k, v in attn.state_dict().items()}
    out = attn(x, hw_shape=None)
    ref, ref_loss = reference_primal(x_ref, sd, 3, attn.num_samples)
    assert torch.allclose(out, ref, atol=1e-10, rtol=0)
    assert torch.allclose(attn.ksvd_loss.double(), ref_loss, atol=1e-8, rtol=1e-8)
    # gradients of task output and KSVD loss together
    cot = torch.randn_like(out)
    ((out * cot).sum() + attn.ksvd_loss).backward()
    ((ref * cot).sum() + ref_loss).backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-7, rtol=1e-7)
    for name, prm in attn.named_parameters():
        assert torch.allclose(prm.grad, sd[name].grad, atol=1e-7, rtol=1e-7), name


def test_primal_ksvd_terms_by_hand():
    """Tiny case: L_e, L_r and the trace against numbers worked out here."""
    attn = PrimalAttention(2, 1, low_rank=1, rank_multi=1, num_tokens_train=1)
    with torch.no_grad():
        attn.w_e.fill_(2.)
        attn.w_r.fill_(3.)
        attn.lambdas.fill_(0.5)
    e = torch.tensor([[[[1.], [3.]]]])  # (B=1, H=1, N=2, s=1)
    r = torch.tensor([[[[2.], [0.]]]])
    terms = attn.ksvd_terms(e, r)
    # L_e = mean(1·.25, 9·.25)/2 = 0.625; L_r = mean(4·.25, 0)/2 = 0.25; T = 2·3 = 6
    assert terms['loss_e'].item() == pytest.approx(0.625)
    assert terms['loss_r'].item() == pytest.approx(0.25)
    assert terms['trace'].item() == pytest.approx(6.)
    assert terms['loss_ksvd'].item() == pytest.approx((0.875 - 6.) ** 2)


def test_collect_ksvd_loss_is_mean_over_layers():
    torch.manual_seed(1)
    model = nn.Sequential(PrimalAttention(8, 2, low_rank=3, rank_multi=2, num_tokens_train=9),
                          nn.Identity(),
                          PrimalAttention(8, 2, low_rank=2, rank_multi=5, num_tokens_train=9))
    with pytest.raises(RuntimeError, match='forward'):
        collect_ksvd_loss(model)
    x = torch.randn(2, 9, 8)
    for m in (model[0], model[2]):
        m(x)
    expected = (model[0].ksvd_loss + model[2].ksvd_loss) / 2
    assert torch.allclose(collect_ksvd_loss(model), expected)
    with pytest.raises(ValueError, match='PrimalAttention'):
        collect_ksvd_loss(nn.Linear(2, 2))


def test_primal_gradients_fp32_bf16_autocast_and_fp16():
    torch.manual_seed(2)
    attn = PrimalAttention(32, 4, low_rank=5, rank_multi=3, num_tokens_train=26)
    x = torch.randn(2, 26, 32, requires_grad=True)
    (attn(x).sum() + 0.05 * attn.ksvd_loss).backward()
    grads = [x.grad] + [p.grad for p in attn.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    attn.zero_grad()
    x2 = x.detach().clone().requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = attn(x2)
        loss = out.float().sum() + 0.05 * collect_ksvd_loss(attn)
    assert out.dtype == torch.bfloat16 and attn.ksvd_loss.dtype == torch.float32
    loss.backward()
    grads = [x2.grad] + [p.grad for p in attn.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    ref = attn(x.detach())
    half = attn.half()(x.detach().half())
    assert half.dtype == torch.float16 and torch.allclose(half.float(), ref, atol=2e-2)


def test_primal_defaults_init_and_registry():
    from mmcbsa.registry import PRETRAIN_MODELS, SEG_MODELS
    attn = SEG_MODELS.build(dict(type='PrimalAttention', embed_dims=48, num_heads=3))
    assert isinstance(PRETRAIN_MODELS.build(
        dict(type='PrimalAttention', embed_dims=48, num_heads=3)), PrimalAttention)
    assert attn.low_rank == 20 and attn.num_samples == 197  # min(197, 20·10)
    eye = torch.eye(20)
    for w in (attn.w_e, attn.w_r):  # each head's n × s matrix has orthonormal columns
        for head in w:
            assert torch.allclose(head.T @ head, eye, atol=1e-5)
    assert ((attn.lambdas >= 0) & (attn.lambdas <= 1)).all()
    assert attn(torch.randn(1, 50, 48), hw_shape=(7, 7)).shape == (1, 50, 48)


def test_primal_build_errors():
    with pytest.raises(ValueError, match='embed_dims'):
        PrimalAttention(50, 3)
    with pytest.raises(ValueError, match='low_rank'):
        PrimalAttention(48, 3, low_rank=0)
    with pytest.raises(ValueError, match='rank_multi'):
        PrimalAttention(48, 3, rank_multi=-1)
    with pytest.raises(ValueError, match='num_tokens_train'):
        PrimalAttention(48, 3, num_tokens_train=0)


def test_primal_converters():
    sd = {f'blocks.1.attn.{k}': torch.zeros(1) for k in
          ('we', 'wr', 'Lambda', 'qk.weight', 'qk.bias', 'proj.weight', 'proj.bias',
           'concate_weight.weight', 'concate_weight.bias')}
    sd['head.weight'] = torch.zeros(1)
    one = convert_primal_attention(sd, src_prefix='blocks.1.attn.')
    assert sorted(one) == ['concat_proj.bias', 'concat_proj.weight', 'lambdas', 'proj.bias',
                           'proj.weight', 'qk.bias', 'qk.weight', 'w_e', 'w_r']
    moved = convert_primal_attention(sd, 'blocks.1.attn.', 'layers.1.attn.')
    assert sorted(moved) == sorted('layers.1.attn.' + k for k in one)
    assert torch.equal(moved['layers.1.attn.w_e'], sd['blocks.1.attn.we'])
    with pytest.raises(KeyError, match='we'):
        convert_primal_attention({'wr': torch.zeros(1)})


@pytest.mark.parametrize('num_samples', [1, 2, 3, 7, 17, 50, 151, 197])
def test_traced_positions_equal_the_exact_ones(num_samples):
    """Exported graphs compute the sample positions from a symbolic N with float64 tensor
    operations (docs/deployment.md): equal to the exact integer rule (and so to ATen's
    linspace) for every N up to 1,100, including N = 257, 513 and 1025 with n = 151, where
    a plain float64 ``N - 1 - step·j`` (two roundings) picks another position."""
    from mmcbsa.models.attentions.primal import linspace_positions, traced_linspace_positions
    for n in range(num_samples, 1100):
        expected = torch.tensor(linspace_positions(n, num_samples))
        assert torch.equal(traced_linspace_positions(n, num_samples), expected), n


def test_traced_positions_under_export():
    """The positions follow the token count of each input of one exported program."""
    from mmcbsa.models.attentions.primal import linspace_positions, sample_positions

    class Positions(nn.Module):
        def forward(self, x):
            return sample_positions(x.shape[1], 5)

    program = torch.export.export(Positions(), (torch.zeros(1, 40), ), strict=False,
                                  dynamic_shapes={'x': {1: torch.export.Dim('n', min=5)}})
    for n in (17, 40, 257):
        got = program.module()(torch.zeros(1, n))
        assert torch.equal(got, torch.tensor(linspace_positions(n, 5))), n
