"""mmcbsa.analysis (docs/mechanisms.md §9): coding rate, sparsity, what AttentionCapture
records, the zero-shot readings and their IoU, weight perturbations.

References are written here with explicit loops and plain torch ops (no mmcbsa code):
``logdet(I_N + c Z Zᵀ)`` per image and head, softmax attention rows, hand-made maps and
masks with IoUs counted by hand.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks.transformer import MultiheadAttention as MMCVMultiheadAttention
from mmpretrain.models.utils.attention import MultiheadAttention as PretrainMHA
from mmseg.registry import MODELS as SEG_MODELS

import mmcbsa  # noqa: F401
from mmcbsa.analysis import (AttentionCapture, coding_rate, mass_threshold_mask,
                             orthogonal_transform_, perturb_parameters_, random_orthogonal,
                             score_binary_masks, sparsity)
from mmcbsa.analysis.capture import layer_labels
from mmcbsa.analysis.zero_shot import (binary_ground_truth, cls_foreground, grid_partition,
                                       grid_to_image, label_clusters_by_majority)


# ----------------------------------------------------------------------------------------
# coding rate and sparsity
# ----------------------------------------------------------------------------------------
def ref_coding_rate(z, heads, eps=0.01):
    """Σ_h ½ logdet(I_N + p/(N ε) Z_h Z_hᵀ), N×N form, one image and head at a time."""
    b, n, c = z.shape
    p = c // heads
    out = torch.zeros(b, dtype=torch.float64)
    for i in range(b):
        for h in range(heads):
            zh = z[i, :, h * p:(h + 1) * p].double()
            mat = torch.eye(n, dtype=torch.float64) + p / (n * eps) * zh @ zh.T
            out[i] += 0.5 * torch.logdet(mat)
    return out


@pytest.mark.parametrize('n,c,heads', [(17, 12, 3), (5, 24, 2), (9, 8, 1)])
def test_coding_rate_matches_logdet(n, c, heads):
    # both Gram sides: p <= N (17 tokens, p=4) and p > N (5 tokens, p=12)
    torch.manual_seed(0)
    z = torch.randn(3, n, c)
    got = coding_rate(z, heads)
    assert got.shape == (3, ) and got.dtype == torch.float64
    torch.testing.assert_close(got, ref_coding_rate(z, heads), rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(coding_rate(z, heads, eps=0.5), ref_coding_rate(z, heads, 0.5),
                               rtol=1e-10, atol=1e-9)


def test_coding_rate_known_answers():
    n, p, eps = 10, 4, 0.01
    c = p / (n * eps)
    # orthonormal columns scaled by s: Z Zᵀ has p eigenvalues s², so R = p/2 log(1 + c s²)
    q, _ = torch.linalg.qr(torch.randn(n, p, dtype=torch.float64))
    s = 0.7
    z = (s * q).unsqueeze(0)
    assert coding_rate(z, 1).item() == pytest.approx(0.5 * p * math.log(1 + c * s * s),
                                                     rel=1e-12)
    # rank one, u vᵀ: one eigenvalue |u|²|v|²
    u, v = torch.randn(n, dtype=torch.float64), torch.randn(p, dtype=torch.float64)
    z = torch.outer(u, v).unsqueeze(0)
    expected = 0.5 * math.log(1 + c * float(u @ u) * float(v @ v))
    assert coding_rate(z, 1).item() == pytest.approx(expected, rel=1e-12)
    # two heads are summed: the same rank-one block twice
    assert coding_rate(torch.cat([z, z], -1), 2).item() == pytest.approx(2 * expected,
                                                                         rel=1e-12)
    assert coding_rate(torch.zeros(2, n, 6), 3).tolist() == [0.0, 0.0]


def test_coding_rate_errors():
    with pytest.raises(ValueError, match='num_heads'):
        coding_rate(torch.randn(1, 4, 10), 3)
    with pytest.raises(ValueError, match='num_heads'):
        coding_rate(torch.randn(1, 4, 10), 0)
    with pytest.raises(ValueError, match=r'\(B, N, C\)'):
        coding_rate(torch.randn(4, 10), 1)


def test_sparsity():
    t = torch.tensor([[[0., 1.], [0., 0.]], [[2., 3.], [0., -1.]]])
    assert sparsity(t).item() == pytest.approx(4 / 8)
    assert sparsity(t, per_sample=True).tolist() == [0.75, 0.25]
    assert sparsity(torch.relu(torch.tensor([-1., 1e-30, -0.0]))).item() == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------------------
# what AttentionCapture records equals what the modules compute
# ----------------------------------------------------------------------------------------
def _tokens(b, prefix, h, w, c, seed=0):
    torch.manual_seed(seed)
    return torch.randn(b, prefix + h * w, c)


def _patch_map(row, prefix, h, w):
    return row[..., prefix:].reshape(*row.shape[:-1], h, w)


def test_mssa_records_softmax_and_projection():
    mssa = SEG_MODELS.build(dict(type='MSSA', embed_dims=12, num_heads=3, head_dims=4)).eval()
    x = _tokens(2, 1, 3, 4, 12)
    state = dict(vars(mssa))
    with torch.no_grad():
        y_plain = mssa(x, hw_shape=(3, 4))
        with AttentionCapture(mssa) as cap:
            y_rec = mssa(x, hw_shape=(3, 4))
    assert vars(mssa).keys() == state.keys()  # capturing leaves no state in the module
    torch.testing.assert_close(y_rec, y_plain, rtol=0, atol=1e-6)
    own = mssa.attention_maps(x, hw_shape=(3, 4))['attention']
    (rec, ) = cap.layers
    w = x @ mssa.in_proj.weight.T
    torch.testing.assert_close(rec.projection, w)
    assert rec.hw_shape == (3, 4) and rec.num_prefix == 1 and rec.query == 'cls'
    for b in range(2):
        for h in range(3):
            wh = w[b, :, h * 4:(h + 1) * 4]
            attn = torch.softmax(wh @ wh.T / 2.0, dim=-1)  # 1/√p, p = 4
            torch.testing.assert_close(own[b, h], attn, rtol=0, atol=1e-6)
            torch.testing.assert_close(rec.maps['cls'][b, h, 0],
                                       _patch_map(attn[0], 1, 3, 4), rtol=0, atol=1e-6)


def test_mhsa_records_softmax_and_value_projection():
    mhsa = SEG_MODELS.build(dict(type='MHSA', embed_dims=8, num_heads=2)).eval()
    x = _tokens(1, 1, 2, 3, 8)
    with torch.no_grad():
        y_plain = mhsa(x, hw_shape=(2, 3))
        with AttentionCapture(mhsa, query='mean') as cap:
            y_rec = mhsa(x, hw_shape=(2, 3))
    torch.testing.assert_close(y_rec, y_plain, rtol=0, atol=1e-6)
    (rec, ) = cap.layers
    qkv = x @ mhsa.qkv.weight.T + mhsa.qkv.bias
    torch.testing.assert_close(rec.projection, qkv[..., 16:])  # the value part
    for h in range(2):
        q, k = qkv[0, :, h * 4:(h + 1) * 4], qkv[0, :, 8 + h * 4:8 + (h + 1) * 4]
        attn = torch.softmax(q @ k.T / 2.0, dim=-1)
        mean_row = attn[1:].mean(0)  # mean over the patch queries
        torch.testing.assert_close(rec.maps['mean'][0, h, 0], _patch_map(mean_row, 1, 2, 3),
                                   rtol=0, atol=1e-6)


def test_tssa_records_group_assignment():
    tssa = SEG_MODELS.build(dict(type='TSSA', embed_dims=6, num_heads=3)).eval()
    with torch.no_grad():
        tssa.temp.copy_(torch.tensor([0.5, 1.0, 2.0]))
    x = _tokens(2, 1, 2, 2, 6)
    with torch.no_grad(), AttentionCapture(tssa) as cap:
        tssa(x, hw_shape=(2, 2))
    pi = tssa.attention_maps(x, hw_shape=(2, 2))['assignment']
    assert pi.shape == (2, 3, 5)
    w = x @ tssa.in_proj.weight.T
    for b in range(2):
        score = torch.zeros(5, 3)
        for h in range(3):
            wh = w[b, :, h * 2:(h + 1) * 2]
            wn = wh / wh.norm(dim=0, keepdim=True)  # normalised over tokens
            score[:, h] = (wn ** 2).sum(-1) * tssa.temp[h]
        torch.testing.assert_close(pi[b].T, torch.softmax(score, dim=-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(pi.sum(1), torch.ones(2, 5))
    (rec, ) = cap.layers
    torch.testing.assert_close(rec.maps['groups'][:, :, 0], pi[..., 1:].reshape(2, 3, 2, 2))
    assert torch.equal(rec.maps['clusters'][:, 0, 0], pi[..., 1:].argmax(1).reshape(2, 2, 2))


def test_cbsa_capture_reproduces_the_extraction_and_its_maps():
    cbsa = SEG_MODELS.build(dict(type='CBSA', embed_dims=12, num_heads=2,
                                 num_reps=(2, 2))).eval()
    h, w = 4, 4
    x = _tokens(2, 1, h, w, 12)
    with torch.no_grad(), AttentionCapture(cbsa) as cap:
        cbsa(x, hw_shape=(h, w))
    (rec, ) = cap.layers
    proj = rec.projection
    torch.testing.assert_close(proj, x @ cbsa.in_proj.weight.T)
    # the captured w reproduces the attention CBSA recorded: softmax(pool(w) wᵀ / √p)
    img = proj[:, 1:].reshape(2, h, w, 12).permute(0, 3, 1, 2)
    r0 = F.adaptive_avg_pool2d(img, (2, 2)).flatten(2).transpose(1, 2)  # (B, 4, 12)
    attn = cbsa.attention_maps(x, hw_shape=(h, w))['attention']  # (B, H, m, N)
    for b in range(2):
        for hd in range(2):
            wh, rh = proj[b, :, hd * 6:(hd + 1) * 6], r0[b, :, hd * 6:(hd + 1) * 6]
            a = torch.softmax(rh @ wh.T / math.sqrt(6), dim=-1)
            torch.testing.assert_close(attn[b, hd], a, rtol=0, atol=1e-6)
            # CLS row of AᵀA: Σ_r A[r, 0] A[r, n]
            row = sum(a[r, 0] * a[r] for r in range(4))
            torch.testing.assert_close(rec.maps['cls'][b, hd, 0], _patch_map(row, 1, h, w),
                                       rtol=0, atol=1e-6)
            assert rec.maps['cls'][b, hd, 0].sum() <= a[:, 0].sum() + 1e-6
            torch.testing.assert_close(rec.maps['reps'][b, hd], _patch_map(a, 1, h, w))
            assert torch.equal(rec.maps['clusters'][b, hd, 0],
                               a[:, 1:].argmax(0).reshape(h, w))


def test_mmseg_vit_attention_maps_are_the_modules_own_softmax():
    # mmseg's ViT layers: mmcv MultiheadAttention around torch's nn.MultiheadAttention
    torch.manual_seed(0)
    attn = MMCVMultiheadAttention(embed_dims=8, num_heads=2, batch_first=True).eval()
    x = _tokens(2, 1, 3, 3, 8, seed=1)
    inner = attn.attn
    with torch.no_grad(), AttentionCapture(attn) as cap:
        attn(x)
    (rec, ) = cap.layers
    assert rec.type == 'MultiheadAttention' and rec.name == 'attn'
    assert rec.hw_shape == (3, 3) and rec.num_prefix == 1  # square guess, one prefix token
    with torch.no_grad():
        _, weights = inner(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1),
                           need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(rec.maps['cls'][:, :, 0], _patch_map(weights[:, :, 0], 1, 3, 3),
                               rtol=0, atol=1e-6)
    wv, bv = inner.in_proj_weight[16:], inner.in_proj_bias[16:]
    torch.testing.assert_close(rec.projection, x @ wv.T + bv)


def test_segmenter_head_tokens_after_the_patches():
    # mmseg's Segmenter mask transformer appends its class tokens after the patches
    from seg_helpers import tiny_vit_segmentor
    torch.manual_seed(0)
    model = tiny_vit_segmentor(dict(type='SegmenterMaskTransformerHead', in_channels=24,
                                    channels=24, num_classes=3, num_layers=1, num_heads=2,
                                    embed_dims=24, drop_path_rate=0.0)).eval()
    inner = model.decode_head.layers[0].attn.attn  # torch nn.MultiheadAttention
    seen = []
    handle = inner.register_forward_pre_hook(lambda m, a, k: seen.append(k['query']),
                                             with_kwargs=True)
    with torch.no_grad(), AttentionCapture(model) as cap:
        model.decode_head(model.extract_feat(torch.randn(1, 3, 32, 32)))
    handle.remove()
    head = [r for r in cap.layers if r.group == 'decode_head'][-1]
    assert head.hw_shape == (4, 4) and head.num_prefix == 3 and head.query == 'mean'
    x = seen[-1]  # (N, B, C), patches first then 3 class tokens
    with torch.no_grad():
        _, weights = inner(x, x, x, need_weights=True, average_attn_weights=False)
    expected = weights[0, :, :16, :16].mean(1).reshape(2, 4, 4)  # patch queries and keys
    torch.testing.assert_close(head.maps['mean'][0, :, 0], expected, rtol=0, atol=1e-6)


def test_mmpretrain_attention_map_from_its_qkv():
    torch.manual_seed(0)
    mha = PretrainMHA(embed_dims=8, num_heads=2).eval()
    x = _tokens(1, 1, 2, 2, 8, seed=2)
    with torch.no_grad(), AttentionCapture(mha) as cap:
        mha(x)
    (rec, ) = cap.layers
    qkv = x[0] @ mha.qkv.weight.T + mha.qkv.bias
    for h in range(2):
        q, k = qkv[:, h * 4:(h + 1) * 4], qkv[:, 8 + h * 4:8 + (h + 1) * 4]
        row = torch.softmax(q[0] @ k.T / 2.0, dim=-1)
        torch.testing.assert_close(rec.maps['cls'][0, h, 0], _patch_map(row, 1, 2, 2),
                                   rtol=0, atol=1e-6)
    torch.testing.assert_close(rec.projection, qkv[None, :, 16:])


def _ref_pool(t, h, w, grid):
    """``(N_patch, C)`` row-major patches -> ``(s_h·s_w, C)`` windowed means (torch's
    adaptive-pooling windows ``[floor(i·h/s), ceil((i+1)·h/s))``)."""
    img, (sh, sw) = t.reshape(h, w, -1), grid
    rows = []
    for i in range(sh):
        for j in range(sw):
            win = img[(i * h) // sh:-(-((i + 1) * h) // sh), (j * w) // sw:-(-((j + 1) * w) // sw)]
            rows.append(win.reshape(-1, t.shape[-1]).mean(0))
    return torch.stack(rows)


def _ref_adapted_cls(qkv, heads, prefix, h, w, grid):
    """CLS row over the patches of ``softmax_reps(q Q0ᵀ/√p) softmax_tokens(Q0 kᵀ/√p)``
    per head (docs/mechanisms.md §8), from one image's ``qkv`` ``(N, 3C)``."""
    c = qkv.shape[-1] // 3
    p = c // heads
    q_all, k_all = qkv[:, :c], qkv[:, c:2 * c]
    reps = _ref_pool(q_all[prefix:], h, w, grid)  # pooled over all C channels
    rows = []
    for hd in range(heads):
        sl = slice(hd * p, (hd + 1) * p)
        q, k, r = q_all[:, sl], k_all[:, sl], reps[:, sl]
        contract = torch.softmax(r @ k.T / math.sqrt(p), dim=-1)  # (m, N)
        bcast = torch.softmax(q @ r.T / math.sqrt(p), dim=-1)  # (N, m)
        rows.append(_patch_map(bcast[0] @ contract, prefix, h, w))
    return torch.stack(rows)


def test_adapted_cbsa_capture_is_its_effective_attention():
    torch.manual_seed(0)
    attn = SEG_MODELS.build(dict(type='AdaptedCBSA', embed_dims=12, num_heads=3,
                                 num_reps=(2, 3))).eval()
    x = _tokens(2, 1, 4, 6, 12, seed=3)
    with torch.no_grad(), AttentionCapture(attn) as cap:
        attn(x, hw_shape=(4, 6))
    (rec, ) = cap.layers
    assert rec.query == 'cls' and set(rec.maps) == {'cls', 'reps', 'clusters'}
    assert rec.maps['reps'].shape == (2, 3, 6, 4, 6)
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    for b in range(2):
        torch.testing.assert_close(rec.maps['cls'][b, :, 0],
                                   _ref_adapted_cls(qkv[b], 3, 1, 4, 6, (2, 3)),
                                   rtol=0, atol=1e-6)
    torch.testing.assert_close(rec.projection, qkv[..., 24:])  # the value part


@pytest.mark.parametrize('gate', [False, True])
def test_mita_capture_experts_routed_keys_and_values(gate):
    torch.manual_seed(0)
    attn = SEG_MODELS.build(dict(type='MiTA', embed_dims=8, num_heads=2, num_landmarks=4,
                                 topk=5, dwc=gate, gate=gate)).eval()
    x = _tokens(1, 1, 4, 6, 8, seed=4)
    with torch.no_grad(), AttentionCapture(attn) as cap:
        attn(x, hw_shape=(4, 6))
    (rec, ) = cap.layers
    proj = attn.qkvg if gate else attn.qkv
    out = x[0] @ proj.weight.T + proj.bias
    c, p = 8, 4
    q_all, k_all = out[:, :c], out[:, c:2 * c]
    reps = _ref_pool(q_all[1:], 4, 6, (2, 2))
    for hd in range(2):
        sl = slice(hd * p, (hd + 1) * p)
        q, k, r = q_all[:, sl], k_all[:, sl], reps[:, sl]
        expert = (q @ r.T).argmax(-1)  # the gate of every token
        torch.testing.assert_close(rec.maps['clusters'][0, hd, 0], _patch_map(expert, 1, 4, 6))
        for e in range(4):  # each landmark expert's 5 routed keys, as an indicator
            keys = torch.zeros(25)
            keys[(r[e] @ k.T).topk(5).indices] = 1
            torch.testing.assert_close(rec.maps['routed_keys'][0, hd, e],
                                       _patch_map(keys, 1, 4, 6))
    torch.testing.assert_close(rec.projection[0], out[:, 2 * c:3 * c])  # the values


def _qkv_inputs(module, batch_first):
    """Record the input of ``module`` (its ``query`` / first argument)."""
    seen = []

    def hook(mod, args, kwargs):
        seen.append(kwargs.get('query', args[0] if args else None))

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize('library', ['mmpretrain', 'mmseg'])
def test_adapted_vit_capture_reads_the_adapted_attention(library):
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS as PRETRAIN_MODELS
    registry = PRETRAIN_MODELS if library == 'mmpretrain' else SEG_MODELS
    if library == 'mmpretrain':
        cfg = dict(arch=dict(embed_dims=16, num_layers=2, num_heads=2,
                             feedforward_channels=32), out_type='featmap')
    else:
        cfg = dict(embed_dims=16, num_layers=2, num_heads=2, mlp_ratio=2)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope(library):
        vit = registry.build(dict(type='AdaptedVisionTransformer', img_size=(64, 96),
                                  patch_size=16, adapt_layers=[-1],
                                  adapt_cfg=dict(num_reps=(2, 2)), **cfg))
    vit.eval()  # (the libraries' ViT.train() returns None: no chaining)
    inner = vit.layers[1].attn.attn if library == 'mmseg' else vit.layers[1].attn.qkv
    seen, handle = _qkv_inputs(inner, batch_first=False)
    with torch.no_grad(), AttentionCapture(vit) as cap:
        vit(torch.randn(1, 3, 64, 96))
    handle.remove()
    assert len(cap.layers) == 2  # one record per layer, adapted or not
    rec = cap.layers[1]
    assert rec.hw_shape == (4, 6) and rec.query == 'cls' and 'reps' in rec.maps
    if library == 'mmseg':
        tokens = seen[-1] if inner.batch_first else seen[-1].transpose(0, 1)
        qkv = tokens[0] @ inner.in_proj_weight.T + inner.in_proj_bias
    else:
        qkv = seen[-1][0] @ inner.weight.T + inner.bias
    torch.testing.assert_close(rec.maps['cls'][0, :, 0],
                               _ref_adapted_cls(qkv, 2, 1, 4, 6, (2, 2)), rtol=0, atol=1e-6)
    torch.testing.assert_close(rec.projection[0], qkv[:, 32:])
    # the plain layer 0 keeps its softmax map (not the adapted one)
    assert set(cap.layers[0].maps) == {'cls'}


def test_capture_in_a_backbone_labels_layers_and_ista():
    vit = SEG_MODELS.build(dict(
        type='WhiteBoxViT', arch=dict(base='cbt-tiny', embed_dims=16, num_layers=2,
                                      num_heads=2, attn_cfg=dict(head_dims=8, num_reps=4)),
        img_size=32, patch_size=8, out_type='featmap')).eval()
    with torch.no_grad(), AttentionCapture(vit, maps=False) as cap:
        vit(torch.randn(2, 3, 32, 48))
    assert [r.name for r in cap.layers] == ['layers.0.attn', 'layers.1.attn']
    assert [r.hw_shape for r in cap.layers] == [(4, 6), (4, 6)]
    assert layer_labels(cap.layers) == ['layers.0', 'layers.1']
    assert [r.name for r in cap.ista] == ['layers.0.ffn', 'layers.1.ffn']
    out = cap.ista[1].output
    assert sparsity(out).item() == pytest.approx(float((out == 0).double().mean()))
    assert all(not r.maps for r in cap.layers)  # maps=False: nothing recorded


# ----------------------------------------------------------------------------------------
# zero-shot readings and their IoU
# ----------------------------------------------------------------------------------------
def test_mass_threshold_keeps_the_smallest_set():
    m = torch.tensor([[0.40, 0.30, 0.10], [0.10, 0.05, 0.05]])
    keep = mass_threshold_mask(m, 0.6)  # 0.4 (< 0.6 so far), 0.3 -> 0.7, stop
    assert keep.tolist() == [[True, True, False], [False, False, False]]
    assert mass_threshold_mask(m * 7, 0.6).tolist() == keep.tolist()  # scale-free
    assert mass_threshold_mask(m, 0.35).sum() == 1
    assert mass_threshold_mask(m, 1.0).all()
    # union over heads
    heads = torch.stack([m, m.flip(-1)])[None]  # (1, 2, 2, 3)
    assert cls_foreground(heads, 0.6)[0].tolist() == [[True, True, True], [False, False, False]]


def test_zero_shot_iou_of_a_hand_made_map():
    m = torch.tensor([[0.40, 0.30, 0.10], [0.10, 0.05, 0.05]])
    pred = mass_threshold_mask(m, 0.6).long()
    gt = torch.tensor([[1, 0, 0], [1, 0, 255]])
    # by hand: fg pred {(0,0),(0,1)}, gt fg {(0,0),(1,0)}: 1 / 3; bg pred {(0,2),(1,0),
    # (1,1)} (the ignored (1,2) does not count), gt bg {(0,1),(0,2),(1,1)}: 2 / 4
    res = score_binary_masks([pred], [gt])
    assert res['IoU.foreground'] == pytest.approx(100 / 3)
    assert res['IoU.background'] == pytest.approx(50.0)
    assert res['mIoU'] == pytest.approx((100 / 3 + 50) / 2)
    assert res['aAcc'] == pytest.approx(100 * 3 / 5)


def test_cluster_labelling_and_ground_truth():
    labels = torch.tensor([[3, 3, 5, 5], [3, 7, 5, 255], [0, 0, 7, 255]])
    gt = binary_ground_truth(labels, background=[3, 0])
    assert gt.tolist() == [[0, 0, 1, 1], [0, 1, 1, 255], [0, 0, 1, 255]]
    dominant = binary_ground_truth(labels)  # class 3 and 5 tie at 3 pixels: mode is 3
    assert dominant[0, 0] == 0 and dominant[0, 2] == 1
    parts = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [2, 2, 2, 2]])
    # part 0: 0/3 fg -> bg; part 1: 4/4 valid fg -> fg; part 2: 1/3 valid fg -> bg
    fg = label_clusters_by_majority(parts, gt)
    assert fg.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]]
    assert grid_partition(4, 6, 6).tolist() == [[0, 0, 1, 1, 2, 2]] * 2 + [[3, 3, 4, 4, 5, 5]] * 2


def test_grid_to_image_follows_the_patches():
    grid = torch.tensor([[1, 2], [3, 4]])
    # 2x2 patches of 3 px over a 6x6 input holding a 5x6 image, evaluated at 10x12
    out = grid_to_image(grid, (6, 6), (5, 6), (10, 12))
    assert out.shape == (10, 12)
    assert out[0, 0] == 1 and out[0, 11] == 2 and out[9, 0] == 3 and out[9, 11] == 4
    # output rows 4-5 show image row 2 (first patch row), rows 6-7 image row 3 (second)
    assert out[5, 0] == 1 and out[6, 0] == 3


# ----------------------------------------------------------------------------------------
# perturbations
# ----------------------------------------------------------------------------------------
def _depict_segmentor():
    from seg_helpers import tiny_vit_segmentor
    torch.manual_seed(0)
    return tiny_vit_segmentor(dict(type='DEPICTHead', in_channels=24, channels=24,
                                   num_classes=5, num_layers=2, num_heads=3, head_dims=4))


def test_gaussian_noise_scope_and_seed():
    model = _depict_segmentor()
    clean = {k: v.clone() for k, v in model.state_dict().items()}
    perturb_parameters_(model, 0.0, 'all', torch.Generator().manual_seed(0))
    assert all(torch.equal(v, clean[k]) for k, v in model.state_dict().items())
    n = perturb_parameters_(model, 0.1, 'head', torch.Generator().manual_seed(3))
    assert n == sum(p.numel() for p in model.decode_head.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, clean[k]) == (not k.startswith('decode_head.')), k
    diff = torch.cat([(model.state_dict()[k] - clean[k]).flatten()
                      for k in clean if k.startswith('decode_head.')])
    assert 0.08 < float(diff.std()) < 0.12
    again = _depict_segmentor()
    perturb_parameters_(again, 0.1, 'head', torch.Generator().manual_seed(3))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    with pytest.raises(ValueError, match='scope'):
        perturb_parameters_(model, 0.1, 'neck')
    # a name pattern: only the U matrices of the head's MSSA layers
    fresh = _depict_segmentor()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    n = perturb_parameters_(fresh, 0.1, 'head', torch.Generator().manual_seed(0), 'in_proj')
    assert n == 2 * 12 * 24  # 2 layers, U of (H p) x d = 12 x 24
    changed = {k for k, v in fresh.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {'decode_head.layers.0.attn.in_proj.weight',
                       'decode_head.layers.1.attn.in_proj.weight'}


def test_orthogonal_transforms_of_depict_heads():
    q = random_orthogonal(5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(q @ q.T, torch.eye(5, dtype=torch.float64))
    model = _depict_segmentor().eval()
    head = model.decode_head
    feat = [torch.randn(2, 24, 3, 4)]
    with torch.no_grad():
        clean = head(feat)
        u0 = head.layers[0].attn.in_proj.weight.clone()
        orthogonal_transform_(model, 'per_head', 'head', torch.Generator().manual_seed(1))
        u1 = head.layers[0].attn.in_proj.weight
        # per head: U_h -> Q_h U_h, the Gram matrix of each head's rows is kept ...
        for h in range(3):
            torch.testing.assert_close(u1[h * 4:(h + 1) * 4].T @ u1[h * 4:(h + 1) * 4],
                                       u0[h * 4:(h + 1) * 4].T @ u0[h * 4:(h + 1) * 4])
        assert not torch.allclose(u1, u0)
        # ... and the tied layer computes the same function (the compression view)
        torch.testing.assert_close(head(feat), clean, rtol=0, atol=1e-5)
        orthogonal_transform_(model, 'whole', 'head', torch.Generator().manual_seed(2))
        # mixing the heads' subspaces changes the decoder
        assert (head(feat) - clean).abs().max() > 1e-2
    cbt = SEG_MODELS.build(dict(type='CBTHead', in_channels=8, channels=8, num_classes=3,
                                num_layers=1, num_heads=2, head_dims=4, num_reps=4))
    with pytest.raises(ValueError, match='tied'):
        orthogonal_transform_(nn.ModuleDict(dict(head=cbt)), 'whole', 'head')
