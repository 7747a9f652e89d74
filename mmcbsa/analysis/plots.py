"""Small drawing helpers for the analysis tools (matplotlib ``Figure`` objects, no pyplot:
importing this does not change a notebook's backend).

Everything returns or takes ``uint8`` RGB images ``(H, W, 3)``; maps are ``(h, w)``
patch grids, shown as blocks over the image (nearest upsampling, like the reference
notebooks) so that each patch's value is visible as is.
"""
from typing import List, Optional, Sequence

import cv2
import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from .zero_shot import grid_to_image

__all__ = ['to_rgb_image', 'upsample_grid', 'heat_overlay', 'label_overlay', 'mask_overlay',
           'save_tile_grid', 'new_figure']


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib ``Figure`` of ``width × height`` inches (save with ``savefig``)."""
    return Figure(figsize=(width, height))


def set_title(fig: Figure, title: str, fontsize: float = 9) -> None:
    """``fig.suptitle`` wrapped to the figure's width (a long title is never clipped at
    the edges): about ``13 × width-in-inches × 9 / fontsize`` characters per line."""
    import textwrap
    width = max(20, int(13 * fig.get_figwidth() * 9 / fontsize))
    fig.suptitle('\n'.join(textwrap.wrap(title, width)), fontsize=fontsize)


def to_rgb_image(inputs: Tensor, bgr: bool = True) -> np.ndarray:
    """A pipeline's packed ``(3, H, W)`` image tensor (``uint8``, BGR as mmcv loads it)
    -> ``(H, W, 3)`` RGB ``uint8``.

    Args:
        inputs: ``(C, H, W)`` tensor.
        bgr: the channels are BGR (mmcv's ``LoadImageFromFile``) and are flipped.
    """
    img = inputs.detach().cpu()
    if img.dtype != torch.uint8:
        img = img.clamp(0, 255).round().to(torch.uint8)
    img = img.permute(1, 2, 0).numpy()
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, -1)
    return np.ascontiguousarray(img[..., ::-1] if bgr else img)


def upsample_grid(grid: Tensor, input_shape: Sequence[int],
                  image_shape: Sequence[int]) -> np.ndarray:
    """A patch-grid map ``(h, w)`` over the network input ``input_shape`` (maybe padded)
    -> a numpy map over the image ``image_shape`` (see :func:`~.zero_shot.grid_to_image`)."""
    g = grid.detach().cpu()
    return grid_to_image(g, input_shape, image_shape, image_shape).numpy()


def heat_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.7,
                 cmap: str = 'inferno') -> np.ndarray:
    """``heat`` (same ``H × W`` as ``image``) scaled to [0, 1] per map, coloured with
    ``cmap`` and blended over the grey version of ``image``.

    Args:
        image: ``(H, W, 3)`` RGB ``uint8``.
        heat: ``(H, W)`` values.
        alpha: weight of the colour.
        cmap: a matplotlib colormap name.
    """
    heat = heat.astype(np.float64)
    lo, hi = float(heat.min()), float(heat.max())
    norm = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    colour = matplotlib.colormaps[cmap](norm)[..., :3] * 255.0
    grey = image.astype(np.float64).mean(-1, keepdims=True)
    return (alpha * colour + (1 - alpha) * grey).clip(0, 255).astype(np.uint8)


def label_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Integer ``labels`` (``H × W``) drawn in distinct colours (tab20, cycled) over
    ``image`` (``(H, W, 3)`` RGB ``uint8``) with weight ``alpha``."""
    palette = (np.asarray(matplotlib.colormaps['tab20'].colors) * 255.0)
    colour = palette[np.asarray(labels, dtype=np.int64) % len(palette)]
    return (alpha * colour + (1 - alpha) * image).clip(0, 255).astype(np.uint8)


def mask_overlay(image: np.ndarray, mask: np.ndarray, ignore: Optional[np.ndarray] = None,
                 alpha: float = 0.65) -> np.ndarray:
    """Foreground ``mask`` in green over the dimmed grey version of ``image``;
    ``ignore`` pixels in mid grey."""
    grey = image.astype(np.float64).mean(-1, keepdims=True).repeat(3, -1)
    out = grey * 0.35
    fg = np.asarray(mask, bool)
    out[fg] = alpha * np.array([40.0, 230.0, 60.0]) + (1 - alpha) * grey[fg]
    if ignore is not None:
        out[np.asarray(ignore, bool)] = 128.0
    return out.clip(0, 255).astype(np.uint8)


_FONT, _SCALE = cv2.FONT_HERSHEY_SIMPLEX, 0.33
_LINE_H = int(round(22 * _SCALE)) + 3


def wrap_text(text: str, width: int, scale: float = _SCALE) -> List[str]:
    """``text`` (``\\n`` splits lines) broken at spaces into lines no wider than ``width``
    pixels in the tiles' font; a single word wider than that is cut into pieces."""
    out: List[str] = []
    fits = lambda t: cv2.getTextSize(t, _FONT, scale, 1)[0][0] <= width - 4  # noqa: E731
    for para in text.split('\n'):
        line = ''
        for word in para.split(' '):
            candidate = f'{line} {word}' if line else word
            if fits(candidate):
                line = candidate
                continue
            if line:
                out.append(line)
            while not fits(word) and len(word) > 1:  # cut an over-long word
                k = len(word) - 1
                while k > 1 and not fits(word[:k]):
                    k -= 1
                out.append(word[:k])
                word = word[k:]
            line = word
        out.append(line)
    return out


def _text_band(width: int, lines: Sequence[str], height: Optional[int] = None,
               centre: bool = True) -> np.ndarray:
    """A white band of ``width`` with ``lines`` of black text, each wrapped to the width
    (cv2 Hershey font); as high as the wrapped text needs, or ``height``."""
    wrapped = [part for line in lines for part in wrap_text(line, width)]
    need = _LINE_H * len(wrapped) + 4
    height = need if height is None else max(height, need)
    band = np.full((height, width, 3), 255, np.uint8)
    y = max(_LINE_H, (height - _LINE_H * len(wrapped)) // 2 + _LINE_H - 2)
    for line in wrapped:
        (tw, _), _ = cv2.getTextSize(line, _FONT, _SCALE, 1)
        x = max(2, (width - tw) // 2) if centre else 2
        cv2.putText(band, line, (x, y), _FONT, _SCALE, (0, 0, 0), 1, cv2.LINE_AA)
        y += _LINE_H
    return band


def _colour_scale(width: int, cmap: str = 'inferno') -> np.ndarray:
    """A band with the heat maps' colour scale: a ``cmap`` gradient between 'low' and
    'high', and what they mean (each map is scaled to its own range)."""
    bar_w = max(40, min(240, width - 70))
    band = np.full((18, width, 3), 255, np.uint8)
    x0 = max(26, (width - bar_w) // 2)
    bar_w = min(bar_w, width - x0 - 30)
    ramp = matplotlib.colormaps[cmap](np.linspace(0, 1, bar_w))[:, :3] * 255
    band[4:14, x0:x0 + bar_w] = ramp[None].astype(np.uint8)
    for text, x in (('low', x0 - 24), ('high', x0 + bar_w + 3)):
        cv2.putText(band, text, (max(1, x), 13), _FONT, _SCALE, (0, 0, 0), 1, cv2.LINE_AA)
    note = _text_band(width, ['colour scale of the heat maps: each map from its own '
                              'minimum (low) to its maximum (high)'])
    return np.concatenate([band, note], axis=0)


def save_tile_grid(tiles: List[List[Optional[np.ndarray]]], path: str,
                   row_labels: Optional[Sequence[str]] = None,
                   col_labels: Optional[Sequence[str]] = None, title: Optional[str] = None,
                   tile_px: int = 112, gap: int = 2, colour_scale: bool = False,
                   legend: Optional[Sequence[str]] = None) -> None:
    """Save a grid of RGB images (rows × columns; ``None`` leaves a cell empty), each
    resized to ``tile_px`` on its longer side (nearest), with column titles, row labels
    (``\\n`` splits lines), a title, optionally the heat maps' colour scale and legend
    lines below, as one PNG (drawn with numpy / OpenCV: fast and small files). Every text
    is wrapped to its band's width: nothing is clipped at the edges."""
    rows, cols = len(tiles), max(len(r) for r in tiles)
    shapes = [t.shape[:2] for r in tiles for t in r if t is not None]
    h0, w0 = shapes[0]
    th, tw = (tile_px, max(1, round(tile_px * w0 / h0))) if h0 >= w0 else \
        (max(1, round(tile_px * h0 / w0)), tile_px)
    label_w = 0 if row_labels is None else 8 + max(
        cv2.getTextSize(part, _FONT, _SCALE, 1)[0][0]
        for lab in row_labels for part in lab.split('\n'))
    heads = [_text_band(tw, [lab]) for lab in (col_labels or [])[:cols]]
    header = max((b.shape[0] for b in heads), default=0)
    grid = np.full((header + rows * (th + gap), label_w + cols * (tw + gap), 3), 255, np.uint8)
    for j, band in enumerate(heads):
        x = label_w + j * (tw + gap)
        grid[:header, x:x + tw] = _text_band(tw, [col_labels[j]], header)
    for i, row in enumerate(tiles):
        y = header + i * (th + gap)
        if row_labels is not None:
            grid[y:y + th, :label_w] = _text_band(label_w, row_labels[i].split('\n'), th,
                                                  centre=False)[:th]
        for j, tile in enumerate(row):
            if tile is None:
                continue
            x = label_w + j * (tw + gap)
            grid[y:y + th, x:x + tw] = cv2.resize(np.ascontiguousarray(tile), (tw, th),
                                                  interpolation=cv2.INTER_NEAREST)
    parts = [grid]
    if title:
        parts.insert(0, _text_band(grid.shape[1], [title]))
    if colour_scale:
        parts.append(_colour_scale(grid.shape[1]))
    if legend:
        parts.append(_text_band(grid.shape[1], list(legend), centre=False))
    grid = np.concatenate(parts, axis=0)
    if not cv2.imwrite(path, grid[..., ::-1], [int(cv2.IMWRITE_PNG_COMPRESSION), 9]):
        raise OSError(f'could not write {path}')
