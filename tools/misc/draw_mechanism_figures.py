"""Draw the two figures of docs/mechanisms.md (matplotlib only; optional).

* ``docs/mechanisms_token_layout.png``: mmcbsa's token layout ``[prefix; patches]`` and
  which tokens feed the pooled representatives — the patch grid (mmcbsa's default) or the
  reference implementations' first ``N - 1`` tokens (``legacy_pooling=True``).
* ``docs/mechanisms_cbsa.png``: CBSA's extract / contract / broadcast data flow with the
  tensor shapes of one head.

Usage::

    python tools/misc/draw_mechanism_figures.py [--out-dir docs]
"""
import argparse
import os
import os.path as osp

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

SIDE = 4  # a 4x4 patch grid, 2x2 representatives
POOL_COLOURS = ['#8dd3c7', '#ffffb3', '#bebada', '#fb8072']  # one per 2x2 pooling window
CLS_COLOUR = '#d9d9d9'


def _window(i: int, j: int) -> int:
    """Pooling window (0..3) of grid cell (i, j) for a 4x4 -> 2x2 average pooling."""
    return (i // 2) * 2 + j // 2


def _cell(ax, x, y, text, colour, size=1.0, fontsize=8, hatch=None):
    ax.add_patch(Rectangle((x, y), size, size, facecolor=colour, edgecolor='black',
                           linewidth=0.8, hatch=hatch))
    ax.text(x + size / 2, y + size / 2, text, ha='center', va='center', fontsize=fontsize)


def _grid(ax, x0, y0, labels, colours, title):
    """A SIDE x SIDE grid, row 0 on top; ``labels``/``colours`` row-major."""
    for k, (label, colour) in enumerate(zip(labels, colours)):
        i, j = divmod(k, SIDE)
        _cell(ax, x0 + j, y0 + SIDE - 1 - i, label, colour)
    ax.text(x0 + SIDE / 2, y0 + SIDE + 0.35, title, ha='center', va='bottom', fontsize=9)


def draw_token_layout(path: str) -> None:
    n_patches = SIDE * SIDE
    fig, ax = plt.subplots(figsize=(9.0, 5.2))
    ax.set_xlim(-0.5, 18.5)
    ax.set_ylim(-2.9, 8.4)
    ax.set_aspect('equal')
    ax.axis('off')

    # the token sequence: CLS first, then the patches row-major
    ax.text(0, 7.75, 'tokens x: (B, N, C),  N = 1 + h·w  (prefix tokens first, patches '
            'row-major)', fontsize=9, va='bottom')
    seq_size = 1.0
    _cell(ax, 0, 6.4, 'CLS', CLS_COLOUR, seq_size, 7)
    for k in range(n_patches):
        i, j = divmod(k, SIDE)
        _cell(ax, (k + 1) * seq_size, 6.4, f'p{k}', POOL_COLOURS[_window(i, j)], seq_size, 7)

    # correct pooling: the patch tokens on their h x w grid
    labels = [f'p{k}' for k in range(n_patches)]
    colours = [POOL_COLOURS[_window(*divmod(k, SIDE))] for k in range(n_patches)]
    _grid(ax, 0.0, 0.4, labels, colours, 'default: patches on their h×w grid')
    ax.text(2.0, -0.6, 'colour = the representative\n(of 2×2 = 4) a patch is pooled '
            'into;\nCLS is not pooled, but it is\nextracted from and broadcast to',
            ha='center', va='top', fontsize=7.5)

    # legacy pooling: the first N - 1 tokens as a floor(sqrt(N)) square
    seq = ['CLS'] + [f'p{k}' for k in range(n_patches - 1)]
    seq_colours = [CLS_COLOUR] + [POOL_COLOURS[_window(*divmod(k, SIDE))]
                                  for k in range(n_patches - 1)]
    _grid(ax, 7.0, 0.4, seq, seq_colours, 'legacy_pooling=True (reference code)')
    for k in range(n_patches):  # outline the window each cell is averaged into
        i, j = divmod(k, SIDE)
        if seq_colours[k] != POOL_COLOURS[_window(i, j)]:
            ax.add_patch(Rectangle((7.0 + j + 0.06, 0.4 + SIDE - 1 - i + 0.06), 0.88, 0.88,
                                   fill=False, edgecolor='red', linewidth=1.4))
    ax.text(9.0, -0.6, 'the first N−1 tokens reshaped:\nCLS at (0, 0), patches shifted by '
            'one,\nthe last patch (p15) dropped;\nred = pooled into the wrong window',
            ha='center', va='top', fontsize=7.5)

    # the window each cell belongs to, for reference
    _grid(ax, 14.0, 0.4, [f'R{_window(*divmod(k, SIDE))}' for k in range(n_patches)],
          [POOL_COLOURS[_window(*divmod(k, SIDE))] for k in range(n_patches)],
          'pooling windows (2×2 grid of reps)')
    ax.text(16.0, -0.6, 'adaptive_avg_pool2d to\n(s_h, s_w) = (2, 2): R0[r] is\n'
            'the mean of window r', ha='center', va='top', fontsize=7.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _box(ax, x, y, w, h, text, colour, fontsize=8.5):
    ax.add_patch(Rectangle((x, y), w, h, facecolor=colour, edgecolor='black', linewidth=0.9))
    ax.text(x + w / 2, y + h / 2, text, ha='center', va='center', fontsize=fontsize)


def _arrow(ax, start, end, text='', offset=(0.0, 0.15), fontsize=7.5, colour='black'):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle='-|>', mutation_scale=11,
                                 linewidth=1.0, color=colour))
    if text:
        ax.text((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1],
                text, ha='center', va='bottom', fontsize=fontsize, color=colour)


def draw_cbsa(path: str) -> None:
    token_c, rep_c, attn_c = '#c6dbef', '#fdd0a2', '#e5e5e5'
    fig, ax = plt.subplots(figsize=(10.5, 3.9))
    ax.set_xlim(0, 20.8)
    ax.set_ylim(0, 7.6)
    ax.axis('off')

    # tokens: x -> w (tall boxes = N rows)
    _box(ax, 0.2, 1.0, 1.6, 5.2, 'x\n(N, C)', token_c)
    _arrow(ax, (1.8, 3.6), (3.0, 3.6), 'U (in_proj)\n§1.1')
    _box(ax, 3.0, 1.0, 1.6, 5.2, 'w_h\n(N, p)', token_c)
    # pooling -> R0 (short boxes = m rows)
    _arrow(ax, (4.6, 5.6), (6.4, 5.6), 'pool patches\n§1.2', fontsize=7)
    _box(ax, 6.4, 4.9, 1.6, 1.5, 'R0_h\n(m, p)', rep_c)
    # extract
    _box(ax, 6.0, 1.0, 2.4, 2.6, 'A_h = softmax_N\n(R0 wᵀ/√p)\n(m, N)\n§1.3', attn_c, 8)
    _arrow(ax, (4.6, 2.3), (6.0, 2.3))
    _arrow(ax, (7.2, 4.9), (7.2, 3.6))
    _arrow(ax, (8.0, 5.6), (10.0, 5.6), 'extract §1.3\nR0 + α_rep · A w', fontsize=7)
    _arrow(ax, (8.4, 3.0), (10.3, 4.9), colour='#555555')
    _box(ax, 10.0, 4.9, 1.6, 1.5, 'R_h\n(m, p)', rep_c)
    # contract
    _arrow(ax, (11.6, 5.6), (14.2, 5.6), 'contract §1.4\nsoftmax(R Rᵀ/√p) R\n(m × m)',
           fontsize=7)
    _box(ax, 14.2, 4.9, 1.6, 1.5, 'Δ_h\n(m, p)', rep_c)
    # broadcast with the same A
    _arrow(ax, (15.0, 4.9), (15.0, 3.6))
    _box(ax, 13.8, 1.0, 2.4, 2.6, 'broadcast\nα_x · A_hᵀ Δ_h\n§1.5', attn_c, 8)
    _arrow(ax, (8.4, 1.5), (13.8, 1.5), 'the same A, transposed (N, m)', offset=(0, 0.08),
           colour='#555555')
    _arrow(ax, (16.2, 2.3), (17.2, 2.3))
    _box(ax, 17.2, 1.0, 1.4, 5.2, 'o_h\n(N, p)', token_c)
    _arrow(ax, (18.6, 3.6), (19.4, 3.6), '§1.6')
    _box(ax, 19.4, 1.0, 1.2, 5.2, 'y\n(N, C)', token_c, 8)
    ax.text(10.4, 7.25, 'CBSA, one head: N tokens (blue), m representatives (orange); '
            'cost ∝ N·m, never N×N', ha='center', va='center', fontsize=9.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out-dir', default=osp.join(osp.dirname(osp.dirname(osp.dirname(
        osp.abspath(__file__)))), 'docs'))
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    draw_token_layout(osp.join(args.out_dir, 'mechanisms_token_layout.png'))
    draw_cbsa(osp.join(args.out_dir, 'mechanisms_cbsa.png'))
    print('wrote', osp.join(args.out_dir, 'mechanisms_token_layout.png'), 'and',
          osp.join(args.out_dir, 'mechanisms_cbsa.png'))


if __name__ == '__main__':
    main()
