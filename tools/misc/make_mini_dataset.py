"""Generate small synthetic datasets in the exact on-disk layouts of ADE20K, Cityscapes
and ImageNet.

The images carry learnable structure: every class has its own colour *and* texture
(stripes, checker board, dots, smooth noise, ...) and is drawn as random shapes; the
labels are exactly the drawn pixels. Output is deterministic for a given seed (each image
is drawn from its own generator seeded by ``(seed, split, index)``).

ADE20K (``--dataset ade20k``), the ``ADEChallengeData2016`` layout read unchanged by
mmseg's ``ADE20KDataset`` (``reduce_zero_label=True``)::

    <out>/images/training/ADE_train_00000001.jpg      RGB images (JPEG)
    <out>/images/validation/ADE_val_00000001.jpg
    <out>/annotations/training/ADE_train_00000001.png  uint8, 1 channel:
    <out>/annotations/validation/ADE_val_00000001.png    0 = other/ignore, 1..150 = ADE ids

Cityscapes (``--dataset cityscapes``), the layout read unchanged by mmseg's
``CityscapesDataset`` (``leftImg8bit`` / ``gtFine`` folders per split and city, train ids
0..18 in ``*_gtFine_labelTrainIds.png``, 255 = ignore)::

    <out>/leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png   RGB (PNG)
    <out>/leftImg8bit/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png
    <out>/gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png  uint8, 1 ch.:
    <out>/gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelTrainIds.png
                                                    0..18 = Cityscapes train ids, 255 = ignore

ImageNet (``--dataset imagenet``), read unchanged by mmpretrain's
``ImageNet(data_root=<out>, split='train'|'val')`` (through ``meta/<split>.txt``, whose
labels are the real ImageNet-1k indices of the wnids, so the 1000 ImageNet class names
stay valid), and by ``CustomDataset(data_root=<out>, data_prefix='train')`` (classes from
the folder names)::

    <out>/train/n01440764/n01440764_0.JPEG
    <out>/val/n01440764/ILSVRC2012_val_00000001.JPEG
    <out>/meta/train.txt     "n01440764/n01440764_0.JPEG 0"
    <out>/meta/val.txt       "n01440764/ILSVRC2012_val_00000001.JPEG 0"

Examples::

    python tools/misc/make_mini_dataset.py --dataset ade20k --out data/mini_ade20k
    python tools/misc/make_mini_dataset.py --dataset cityscapes --out data/mini_cityscapes
    python tools/misc/make_mini_dataset.py --dataset imagenet --out data/mini_imagenet \
        --num-classes 10 --size 64 64
"""
import argparse
import os
import os.path as osp
import sys
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

# ---------------------------------------------------------------------------------------
# Appearance: colour + texture per class
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Appearance:
    """How one class looks: base RGB colour, texture kind and its period (pixels)."""
    colour: Tuple[int, int, int]
    texture: str  # plain | hstripes | vstripes | diag | checker | dots | noise
    period: float
    amplitude: float = 40.0


TEXTURES = ('plain', 'hstripes', 'vstripes', 'diag', 'checker', 'dots', 'noise')


def render_texture(app: Appearance, h: int, w: int, rng: np.random.Generator,
                   jitter: float = 10.0) -> np.ndarray:
    """An ``(h, w, 3)`` float32 RGB canvas filled with ``app``'s textured colour.

    The pattern phase and a small colour offset are random per call, so every instance
    of a class differs slightly while staying recognisable.
    """
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = max(float(app.period), 2.0)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    two_pi = 2.0 * np.pi
    if app.texture == 'plain':
        pattern = np.zeros((h, w), np.float32)
    elif app.texture == 'hstripes':
        pattern = np.sign(np.sin(two_pi * yy / period + phase))
    elif app.texture == 'vstripes':
        pattern = np.sign(np.sin(two_pi * xx / period + phase))
    elif app.texture == 'diag':
        pattern = np.sign(np.sin(two_pi * (xx + yy) / (period * 1.4142) + phase))
    elif app.texture == 'checker':
        pattern = np.sign(np.sin(np.pi * xx / period + phase) *
                          np.sin(np.pi * yy / period + phase))
    elif app.texture == 'dots':
        oy, ox = rng.uniform(0, period, size=2)
        dy = (yy + oy) % period - period / 2
        dx = (xx + ox) % period - period / 2
        pattern = np.where(dy * dy + dx * dx < (period / 3.2)**2, 1.0, -1.0)
    elif app.texture == 'noise':
        gh, gw = int(np.ceil(h / period)) + 2, int(np.ceil(w / period)) + 2
        coarse = rng.standard_normal((gh, gw)).astype(np.float32)
        pattern = cv2.resize(coarse, (int(gw * period), int(gh * period)),
                             interpolation=cv2.INTER_CUBIC)[:h, :w]
        pattern = np.clip(pattern, -1.5, 1.5) / 1.5
    else:
        raise ValueError(f'unknown texture {app.texture!r}; expected one of {TEXTURES}')
    colour = np.asarray(app.colour, np.float32) + rng.normal(0.0, jitter, 3)
    canvas = colour[None, None, :] + app.amplitude * pattern.astype(np.float32)[..., None]
    return canvas


def shape_mask(kind: str, h: int, w: int, rng: np.random.Generator,
               scale: Tuple[float, float] = (0.15, 0.5)) -> np.ndarray:
    """A random filled ``rect`` / ``ellipse`` / ``polygon`` as an ``(h, w)`` bool mask.

    Drawn without anti-aliasing, so the mask is exactly the painted pixels.
    """
    canvas = np.zeros((h, w), np.uint8)
    lo, hi = scale
    if kind == 'rect':
        rh, rw = int(rng.uniform(lo, hi) * h), int(rng.uniform(lo, hi) * w)
        y0, x0 = int(rng.integers(0, max(1, h - rh))), int(rng.integers(0, max(1, w - rw)))
        canvas[y0:y0 + max(rh, 2), x0:x0 + max(rw, 2)] = 1
    elif kind == 'ellipse':
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        ay = max(2, int(rng.uniform(lo, hi) * h / 2))
        ax = max(2, int(rng.uniform(lo, hi) * w / 2))
        cv2.ellipse(canvas, (cx, cy), (ax, ay), float(rng.uniform(0, 180)), 0, 360, 1,
                    thickness=-1, lineType=cv2.LINE_8)
    elif kind == 'polygon':
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        n = int(rng.integers(3, 7))
        angles = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * (2 * np.pi / n)
        angles += rng.uniform(0, 2 * np.pi)
        radius = rng.uniform(lo, hi) * min(h, w) * 0.6 * rng.uniform(0.7, 1.0, n)
        pts = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1)
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1, lineType=cv2.LINE_8)
    else:
        raise ValueError(f'unknown shape {kind!r}')
    return canvas.astype(bool)


def _to_uint8(img: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    img = img + rng.normal(0.0, noise, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _write_png(path: str, image: np.ndarray) -> None:
    """Write an RGB ``(h, w, 3)`` image or an ``(h, w)`` label map as a PNG."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(path, image):
        raise OSError(f'could not write {path}')


def _write_jpeg(path: str, rgb: np.ndarray) -> None:
    ok = cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                     [int(cv2.IMWRITE_JPEG_QUALITY), 95])
    if not ok:
        raise OSError(f'could not write {path}')


def _rng(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, split, index])


# ---------------------------------------------------------------------------------------
# Mini ADE20K
# ---------------------------------------------------------------------------------------

# ADE20K ids (1-based, as in the annotation PNGs) -> appearance.
ADE_CLASSES: Dict[int, Appearance] = {
    1: Appearance((200, 190, 170), 'vstripes', 10),   # wall
    2: Appearance((150, 60, 50), 'checker', 8),       # building
    3: Appearance((110, 170, 240), 'plain', 1, 0.0),  # sky
    4: Appearance((160, 120, 70), 'hstripes', 6),     # floor
    5: Appearance((40, 130, 40), 'noise', 6, 55.0),   # tree
    7: Appearance((90, 90, 90), 'diag', 8),           # road
    10: Appearance((120, 210, 80), 'dots', 7),        # grass
    21: Appearance((220, 40, 160), 'checker', 4),     # car
}
ADE_BACKGROUNDS = (1, 3, 4)
_IGNORE_LOOK = Appearance((128, 128, 128), 'noise', 3, 70.0)


def draw_scene(h: int, w: int, rng: np.random.Generator, classes: Dict[int, Appearance],
               backgrounds: Sequence[int], ignore_label: int) -> Tuple[np.ndarray, np.ndarray]:
    """One ``(h, w, 3)`` uint8 RGB image and its ``(h, w)`` uint8 label map: a textured
    background class, 2–5 random shapes of other classes on top, and in half of the
    images a small noisy region labelled ``ignore_label``."""
    bg = int(rng.choice(backgrounds))
    image = render_texture(classes[bg], h, w, rng)
    label = np.full((h, w), bg, np.uint8)
    foreground = [c for c in classes if c != bg]
    for _ in range(int(rng.integers(2, 6))):
        cls = int(rng.choice(foreground))
        mask = shape_mask(str(rng.choice(['rect', 'ellipse', 'polygon'])), h, w, rng)
        image[mask] = render_texture(classes[cls], h, w, rng)[mask]
        label[mask] = cls
    if rng.random() < 0.5:  # a small region of the ignored label
        mask = shape_mask('ellipse', h, w, rng, scale=(0.05, 0.15))
        image[mask] = render_texture(_IGNORE_LOOK, h, w, rng)[mask]
        label[mask] = ignore_label
    return _to_uint8(image, rng, noise=4.0), label


def draw_ade_sample(h: int, w: int, rng: np.random.Generator,
                    classes: Dict[int, Appearance] = ADE_CLASSES,
                    backgrounds: Sequence[int] = ADE_BACKGROUNDS
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """One ``(h, w, 3)`` uint8 RGB image and its ``(h, w)`` uint8 ADE label map
    (0 = 'other', ignored by mmseg's ``reduce_zero_label``)."""
    return draw_scene(h, w, rng, classes, backgrounds, ignore_label=0)


def make_ade20k(out: str, num_train: int, num_val: int, size: Tuple[int, int],
                seed: int) -> Dict[str, int]:
    """Write the mini ADE20K to ``out``; returns the number of images per split."""
    h, w = size
    counts = {}
    for split_id, (split, prefix, num) in enumerate(
            [('training', 'ADE_train', num_train), ('validation', 'ADE_val', num_val)]):
        img_dir = osp.join(out, 'images', split)
        ann_dir = osp.join(out, 'annotations', split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for i in range(num):
            image, label = draw_ade_sample(h, w, _rng(seed, split_id, i))
            name = f'{prefix}_{i + 1:08d}'
            _write_jpeg(osp.join(img_dir, name + '.jpg'), image)
            if not cv2.imwrite(osp.join(ann_dir, name + '.png'), label):
                raise OSError(f'could not write {name}.png')
        counts[split] = num
    return counts


# ---------------------------------------------------------------------------------------
# Mini Cityscapes
# ---------------------------------------------------------------------------------------

# Cityscapes train ids (0..18, as in *_gtFine_labelTrainIds.png) -> appearance.
CITYSCAPES_CLASSES: Dict[int, Appearance] = {
    0: Appearance((110, 90, 120), 'hstripes', 8),     # road
    1: Appearance((220, 170, 210), 'diag', 6),        # sidewalk
    2: Appearance((150, 70, 60), 'checker', 8),       # building
    6: Appearance((240, 170, 40), 'checker', 4),      # traffic light
    8: Appearance((60, 140, 50), 'noise', 6, 55.0),   # vegetation
    10: Appearance((100, 160, 230), 'plain', 1, 0.0),  # sky
    11: Appearance((220, 30, 60), 'vstripes', 4),     # person
    13: Appearance((30, 40, 160), 'dots', 7),         # car
}
CITYSCAPES_BACKGROUNDS = (0, 2, 10)
CITYSCAPES_IGNORE = 255
# Real Cityscapes city names per split (the dataset finds images recursively).
CITYSCAPES_CITIES = {'train': ('aachen', 'bremen'), 'val': ('frankfurt', 'lindau')}


def make_cityscapes(out: str, num_train: int, num_val: int, size: Tuple[int, int],
                    seed: int) -> Dict[str, int]:
    """Write the mini Cityscapes to ``out``; returns the number of images per split.

    Image ``i`` of a split goes to city ``cities[i % len(cities)]`` as
    ``<city>_<i // len(cities):06d>_000019`` (Cityscapes' annotated frame number).
    """
    h, w = size
    counts = {}
    for split_id, (split, num) in enumerate([('train', num_train), ('val', num_val)]):
        cities = CITYSCAPES_CITIES[split]
        for i in range(num):
            city = cities[i % len(cities)]
            name = f'{city}_{i // len(cities):06d}_000019'
            img_dir = osp.join(out, 'leftImg8bit', split, city)
            ann_dir = osp.join(out, 'gtFine', split, city)
            os.makedirs(img_dir, exist_ok=True)
            os.makedirs(ann_dir, exist_ok=True)
            image, label = draw_scene(h, w, _rng(seed, 20 + split_id, i), CITYSCAPES_CLASSES,
                                      CITYSCAPES_BACKGROUNDS, CITYSCAPES_IGNORE)
            _write_png(osp.join(img_dir, name + '_leftImg8bit.png'), image)
            _write_png(osp.join(ann_dir, name + '_gtFine_labelTrainIds.png'), label)
        counts[split] = num
    return counts


# ---------------------------------------------------------------------------------------
# Mini ImageNet
# ---------------------------------------------------------------------------------------

# The first ImageNet-1k synsets in the standard (sorted wnid) order: index = class id.
IMAGENET_WNIDS: List[str] = [
    'n01440764', 'n01443537', 'n01484850', 'n01491361', 'n01494475', 'n01496331',
    'n01498041', 'n01514668', 'n01514859', 'n01518878', 'n01530575', 'n01531178',
    'n01532829', 'n01534433', 'n01537544', 'n01558993', 'n01560419', 'n01580077',
    'n01582220', 'n01592084'
]
_OBJECT_SHAPES = ('disk', 'square', 'triangle', 'ring', 'cross', 'diamond', 'bar', 'star')


def imagenet_appearance(k: int) -> Tuple[str, Appearance]:
    """Class ``k``'s object shape and appearance (distinct combination per class)."""
    hue = (k * 37) % 180
    hsv = np.uint8([[[hue, 200, 220]]])
    colour = tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])
    texture = TEXTURES[k % len(TEXTURES)]
    return _OBJECT_SHAPES[k % len(_OBJECT_SHAPES)], Appearance(colour, texture, 4 + k % 4)


def object_mask(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A randomly placed and scaled object silhouette of the given kind."""
    canvas = np.zeros((h, w), np.uint8)
    s = rng.uniform(0.25, 0.4) * min(h, w)
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
    rot = rng.uniform(-0.3, 0.3)

    def poly(points):
        pts = np.asarray(points, np.float64)
        c, si = np.cos(rot), np.sin(rot)
        pts = pts @ np.array([[c, si], [-si, c]]) * s + [cx, cy]
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1, lineType=cv2.LINE_8)

    if kind == 'disk':
        cv2.circle(canvas, (int(cx), int(cy)), int(s), 1, -1, cv2.LINE_8)
    elif kind == 'ring':
        cv2.circle(canvas, (int(cx), int(cy)), int(s), 1, max(2, int(s / 3)), cv2.LINE_8)
    elif kind == 'square':
        poly([(-1, -1), (1, -1), (1, 1), (-1, 1)])
    elif kind == 'triangle':
        poly([(0, -1.1), (1, 0.8), (-1, 0.8)])
    elif kind == 'diamond':
        poly([(0, -1.2), (0.8, 0), (0, 1.2), (-0.8, 0)])
    elif kind == 'bar':
        poly([(-1.2, -0.35), (1.2, -0.35), (1.2, 0.35), (-1.2, 0.35)])
    elif kind == 'cross':
        poly([(-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)])
        poly([(-0.3, -1), (0.3, -1), (0.3, 1), (-0.3, 1)])
    elif kind == 'star':
        ang = np.arange(10) * np.pi / 5 - np.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, 1.1, 0.45)
        poly(np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1))
    else:
        raise ValueError(f'unknown object shape {kind!r}')
    return canvas.astype(bool)


def draw_imagenet_sample(k: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """An ``(h, w, 3)`` uint8 RGB image of class ``k`` on a random dull background."""
    grey = int(rng.integers(60, 190))
    background = Appearance((grey, grey, grey), str(rng.choice(['plain', 'noise'])), 8, 25.0)
    image = render_texture(background, h, w, rng, jitter=20.0)
    kind, look = imagenet_appearance(k)
    mask = object_mask(kind, h, w, rng)
    image[mask] = render_texture(look, h, w, rng)[mask]
    return _to_uint8(image, rng, noise=4.0)


def make_imagenet(out: str, num_classes: int, num_train: int, num_val: int,
                  size: Tuple[int, int], seed: int) -> Dict[str, int]:
    """Write the mini ImageNet; ``num_train``/``num_val`` are images *per class*."""
    if not 1 <= num_classes <= len(IMAGENET_WNIDS):
        raise ValueError(f'num_classes ({num_classes}) must be in [1, {len(IMAGENET_WNIDS)}]')
    h, w = size
    os.makedirs(osp.join(out, 'meta'), exist_ok=True)
    counts = {}
    val_index = 0
    for split_id, (split, num) in enumerate([('train', num_train), ('val', num_val)]):
        lines = []
        for k, wnid in enumerate(IMAGENET_WNIDS[:num_classes]):
            folder = osp.join(out, split, wnid)
            os.makedirs(folder, exist_ok=True)
            for i in range(num):
                if split == 'train':
                    name = f'{wnid}_{i}.JPEG'
                else:
                    val_index += 1
                    name = f'ILSVRC2012_val_{val_index:08d}.JPEG'
                image = draw_imagenet_sample(k, h, w, _rng(seed, 10 * split_id + 2,
                                                           k * 100003 + i))
                _write_jpeg(osp.join(folder, name), image)
                lines.append(f'{wnid}/{name} {k}')
        with open(osp.join(out, 'meta', f'{split}.txt'), 'w') as f:
            f.write('\n'.join(lines) + '\n')
        counts[split] = len(lines)
    return counts


# dataset -> (training images, validation images, (H, W)) by default
DEFAULTS = {
    'ade20k': (400, 40, (128, 128)),
    'cityscapes': (200, 20, (128, 256)),
    'imagenet': (20, 5, (64, 64)),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=' '.join(__doc__.split('\n\n')[0].split()))
    parser.add_argument('--dataset', choices=list(DEFAULTS), default='ade20k')
    parser.add_argument('--out', required=True, help='output root directory')
    parser.add_argument('--num-train', type=int, default=None,
                        help='training images (imagenet: per class). Default: ' +
                        ', '.join(f'{k} {v[0]}' for k, v in DEFAULTS.items()))
    parser.add_argument('--num-val', type=int, default=None,
                        help='validation images (imagenet: per class). Default: ' +
                        ', '.join(f'{k} {v[1]}' for k, v in DEFAULTS.items()))
    parser.add_argument('--num-classes', type=int, default=10,
                        help=f'imagenet only: number of classes (1..{len(IMAGENET_WNIDS)})')
    parser.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'), default=None,
                        help='image height and width. Default: ' +
                        ', '.join(f'{k} {v[2][0]} {v[2][1]}' for k, v in DEFAULTS.items()))
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    default_train, default_val, default_size = DEFAULTS[args.dataset]
    size = tuple(args.size or default_size)
    if min(size) < 8:
        raise ValueError(f'size ({size[0]} x {size[1]}) must be at least 8 x 8')
    num_train = default_train if args.num_train is None else args.num_train
    num_val = default_val if args.num_val is None else args.num_val
    if num_train < 0 or num_val < 0:
        raise ValueError(f'num_train ({num_train}) and num_val ({num_val}) must be >= 0')
    if args.dataset == 'ade20k':
        counts = make_ade20k(args.out, num_train, num_val, size, args.seed)
    elif args.dataset == 'cityscapes':
        counts = make_cityscapes(args.out, num_train, num_val, size, args.seed)
    else:
        counts = make_imagenet(args.out, args.num_classes, num_train, num_val, size, args.seed)
    print(f'[make_mini_dataset] {args.dataset} -> {args.out}: {counts} images of size '
          f'{size[0]}x{size[1]}')


if __name__ == '__main__':
    try:
        main()
    except (ValueError, OSError) as err:  # a user's mistake: one line, exit status 1
        sys.exit(f'make_mini_dataset.py: error: {err}')
