"""CBSA attention recording and tools/analysis_tools/visualize_attention.py."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from mmcbsa.models.attentions import CBSA

REPO = Path(__file__).resolve().parents[1]


def test_attention_maps_are_the_extraction_softmax():
    torch.manual_seed(0)
    attn = CBSA(embed_dims=12, num_heads=2, num_reps=(2, 3)).eval()
    h, w, prefix = 4, 6, 1
    x = torch.randn(2, prefix + h * w, 12)
    got = attn.attention_maps(x, hw_shape=(h, w))['attention']
    assert got.shape == (2, 2, 6, prefix + h * w)
    # hand reference (docs/mechanisms.md §1.2-1.3): pool the patch tokens of w = x Uᵀ to
    # 2x3, split heads
    wx = x @ attn.in_proj.weight.t()  # (B, N, Hp)
    grid = wx[:, prefix:].reshape(2, h, w, 12).permute(0, 3, 1, 2)
    r0 = F.adaptive_avg_pool2d(grid, (2, 3)).flatten(2).transpose(1, 2)  # (B, 6, Hp)
    for head in range(2):
        wh, rh = wx[..., head * 6:(head + 1) * 6], r0[..., head * 6:(head + 1) * 6]
        expected = torch.softmax(rh @ wh.transpose(1, 2) / 6 ** 0.5, dim=-1)
        torch.testing.assert_close(got[:, head], expected, rtol=0, atol=1e-6)


def test_tool_draws_one_row_per_head(tmp_path):
    """The command line: an image file at an exact size, the last layer, one row per head
    (image, CLS row of AᵀA, 3 representatives, clusters), the image itself first."""
    rng = np.random.default_rng(0)
    image = np.zeros((48, 64, 3), np.uint8)
    image[:] = (40, 160, 40)
    cv2.circle(image, (30, 22), 12, (0, 0, 220), -1)
    image = np.clip(image + rng.integers(0, 20, image.shape), 0, 255).astype(np.uint8)
    img_path, out = tmp_path / 'img.png', tmp_path / 'vis'
    cv2.imwrite(str(img_path), image)
    cfg = REPO / 'configs/cbt/cbt-nano-p8_1xb8-lion-2e_mini-in1k-64px.py'
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools/analysis_tools/visualize_attention.py'), str(cfg),
         '--image', str(img_path), '--size', '48', '64', '--layers', '-1', '--num-rows', '3',
         '--out-dir', str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert '1 layers drawn (backbone.1)' in proc.stdout
    drawn = cv2.imread(str(out / 'attention_backbone.1.png'))
    assert drawn is not None
    # tiles of 84 x 112 (longer side 112), 2-px gaps, a row-label band as wide as 'head 0';
    # 2 heads x (image, CLS row, 3 representatives, clusters); above: the wrapped title
    # and column titles, below: the colour scale and the legend
    label_w = 8 + cv2.getTextSize('head 0', cv2.FONT_HERSHEY_SIMPLEX, 0.33, 1)[0][0]
    assert drawn.shape[1] == label_w + 6 * (112 + 2)
    expected = cv2.resize(image, (112, 84), interpolation=cv2.INTER_NEAREST)
    column = drawn[:, label_w:label_w + 112]
    rows_at = [y for y in range(drawn.shape[0] - 83)  # the image, exactly, once per head
               if np.array_equal(column[y:y + 84], expected)]
    assert len(rows_at) == 2 and rows_at[1] - rows_at[0] == 84 + 2
    assert rows_at[0] > 20 and drawn.shape[0] > rows_at[1] + 84 + 30  # text above, below
    rows = list(csv.DictReader(open(out / 'attention_maps.csv')))
    assert {(r['map'], r['head']) for r in rows} == {
        (m, h) for m in ('cls', 'reps', 'clusters') for h in ('0', '1')}


def test_csv_statistics_are_per_head(tmp_path, monkeypatch):
    """attention_maps.csv has each head's own statistics: the entropies of the CLS rows
    of mmseg's ViT (torch's nn.MultiheadAttention) against the per-head weights torch
    itself returns (need_weights=True, average_attn_weights=False), one hand-computed
    entropy per head. (The CSV once repeated head 0's row for every head.)"""
    import importlib.util
    import math
    calls = []
    original = torch.nn.MultiheadAttention.forward

    def recording(self, query, key, value, **kwargs):
        kwargs = dict(kwargs, need_weights=True, average_attn_weights=False)
        out, weights = original(self, query, key, value, **kwargs)
        calls.append(weights.detach())  # (B, H, N, N)
        return out, weights

    monkeypatch.setattr(torch.nn.MultiheadAttention, 'forward', recording)
    image = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / 'img.png'), image)
    spec = importlib.util.spec_from_file_location(
        'visualize_attention', REPO / 'tools/analysis_tools/visualize_attention.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg = REPO / 'configs/depict/segmenter-mask_vit-tiny-p8_1xb8-300it_mini-ade20k-128x128.py'
    tool.main([str(cfg), '--image', str(tmp_path / 'img.png'), '--size', '64', '64',
               '--layers', '0', '--out-dir', str(tmp_path / 'out')])
    weights = calls[0][0]  # the first layer's call, image 0: (H, N, N), CLS first
    heads = weights.shape[0]
    expected = []
    for h in range(heads):
        row = weights[h, 0, 1:].double()  # CLS query over the patch tokens
        p = row / row.sum()
        expected.append(-sum(float(v) * math.log(float(v)) for v in p if v > 0))
    rows = [r for r in csv.DictReader(open(tmp_path / 'out' / 'attention_maps.csv'))
            if r['map'] == 'cls']
    assert [int(r['head']) for r in rows] == list(range(heads)) and heads >= 2
    got = [float(r['entropy']) for r in rows]
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-4, (got, expected)
    assert len({round(g, 4) for g in got}) == heads  # distinct heads, distinct numbers
