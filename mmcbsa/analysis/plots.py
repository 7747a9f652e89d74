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


def _text_band(width: int, height: int, lines: Sequence[str], scale: float = 0.33,
               centre: bool = True) -> np.ndarray:
    """A white ``height × width`` band with ``lines`` of black text (cv2 Hershey font)."""
    band = np.full((height, width, 3), 255, np.uint8)
    line_h = int(round(22 * scale)) + 3
    y = max(line_h, (height - line_h * len(lines)) // 2 + line_h - 2)
    for line in lines:
        (tw, _), _ = cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        x = max(1, (width - tw) // 2) if centre else 2
        cv2.putText(band, line, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
        y += line_h
    return band


def save_tile_grid(tiles: List[List[Optional[np.ndarray]]], path: str,
                   row_labels: Optional[Sequence[str]] = None,
                   col_labels: Optional[Sequence[str]] = None, title: Optional[str] = None,
                   tile_px: int = 112, gap: int = 2) -> None:
    """Save a grid of RGB images (rows × columns; ``None`` leaves a cell empty), each
    resized to ``tile_px`` on its longer side (nearest), with column titles, row labels
    (``\\n`` splits lines) and a title, as one PNG (drawn with numpy / OpenCV: fast and
    small files)."""
    rows, cols = len(tiles), max(len(r) for r in tiles)
    shapes = [t.shape[:2] for r in tiles for t in r if t is not None]
    h0, w0 = shapes[0]
    th, tw = (tile_px, max(1, round(tile_px * w0 / h0))) if h0 >= w0 else \
        (max(1, round(tile_px * h0 / w0)), tile_px)
    label_w = 0 if row_labels is None else 8 + 6 * max(
        len(part) for lab in row_labels for part in lab.split('\n'))
    header = 0 if col_labels is None else 14
    grid = np.full((header + rows * (th + gap), label_w + cols * (tw + gap), 3), 255, np.uint8)
    for j, lab in enumerate(col_labels or []):
        if j < cols:
            x = label_w + j * (tw + gap)
            grid[:header, x:x + tw] = _text_band(tw, header, [lab])
    for i, row in enumerate(tiles):
        y = header + i * (th + gap)
        if row_labels is not None:
            grid[y:y + th, :label_w] = _text_band(label_w, th, row_labels[i].split('\n'),
                                                  centre=False)
        for j, tile in enumerate(row):
            if tile is None:
                continue
            x = label_w + j * (tw + gap)
            grid[y:y + th, x:x + tw] = cv2.resize(np.ascontiguousarray(tile), (tw, th),
                                                  interpolation=cv2.INTER_NEAREST)
    if title:
        grid = np.concatenate([_text_band(grid.shape[1], 16, [title]), grid], axis=0)
    if not cv2.imwrite(path, grid[..., ::-1], [int(cv2.IMWRITE_PNG_COMPRESSION), 9]):
        raise OSError(f'could not write {path}')
