"""Models and images for the analysis tools, through mmengine's own builders.

* :func:`build_model` — the config's model in its scope (mmseg or mmpretrain), at the
  config's initialisation (seeded ``init_weights``) or with a checkpoint's weights;
* :func:`build_dataloader` — the config's test (or val) dataloader, in order, optionally
  cut to the first images (``BaseDataset`` ``indices``), built by ``Runner.build_dataloader``;
* :func:`forward_tensor` — one plain forward pass (``mode='tensor'``: backbone + head,
  no post-processing) on a dataloader batch, through the model's data preprocessor.
"""
import copy
import logging
import os.path as osp
from typing import Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
from mmengine.config import Config, ConfigDict
from mmengine.dataset import Compose, pseudo_collate
from mmengine.logging import MMLogger
from mmengine.model import is_model_wrapper
from mmengine.registry import DATASETS, MODELS, init_default_scope
from mmengine.runner import Runner
from mmengine.runner.utils import set_random_seed

from mmcbsa.engine.weights import load_weights

__all__ = ['build_model', 'build_dataloader', 'forward_tensor', 'iter_batches',
           'resolve_device', 'unwrap', 'config_seed', 'single_image_batch']

SPLITS = ('test', 'val')


def resolve_device(name: Optional[str]) -> torch.device:
    """``'cpu'``, ``'cuda'`` / ``'cuda:N'`` or ``None`` / ``'auto'`` (CUDA when present).

    Raises ``ValueError`` (naming ``device``) for CUDA on a machine without it.
    """
    if name in (None, 'auto'):
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device={name!r}: CUDA is not available on this machine')
    if device.type not in ('cpu', 'cuda'):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {name!r}")
    return device


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / mmengine wrapper."""
    return model.module if is_model_wrapper(model) else model


def config_seed(cfg: Config) -> int:
    """``cfg.randomness.seed`` when set, else 0."""
    seed = (cfg.get('randomness') or {}).get('seed')
    return 0 if seed is None else int(seed)


def build_model(cfg: Config, checkpoint: Optional[str] = None,
                device: Optional[str] = 'cpu', allow_partial: bool = False) -> nn.Module:
    """``cfg.model`` built in the config's ``default_scope``, in eval mode on ``device``.

    Without ``checkpoint`` the weights are the config's initialisation
    (``init_weights()`` after seeding with :func:`config_seed`), so two calls give the
    same untrained model; with it, :func:`mmcbsa.engine.weights.load_weights`: a
    checkpoint that does not fit the model (missing, unexpected or mis-shaped tensors)
    is refused with a ``ValueError`` unless ``allow_partial``. A checkpoint that fits
    replaces every tensor, so ``init_weights()`` (and the pretrained download an
    ``init_cfg`` may ask for) is skipped, as in mmseg's ``init_model``; with
    ``allow_partial`` the tensors it lacks keep the config's initialisation.

    Args:
        cfg: an mmseg or mmpretrain config.
        checkpoint: path of a checkpoint, or ``None``.
        device: see :func:`resolve_device`.
        allow_partial: load only the tensors that fit, with a warning.
    """
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    set_random_seed(config_seed(cfg))
    model = MODELS.build(copy.deepcopy(cfg.model))
    if checkpoint is None or allow_partial:
        # with a checkpoint that must fit, every tensor is overwritten: no initialisation
        # (as mmseg's init_model), so no pretrained download of the config's init_cfg
        logger = MMLogger.get_current_instance()
        level = logger.level
        logger.setLevel(logging.WARNING)  # init_weights reports every tensor at INFO level
        try:
            model.init_weights()
        finally:
            logger.setLevel(level)
    if checkpoint is not None:
        load_weights(model, checkpoint, allow_partial)
    return model.to(resolve_device(device)).eval()


def build_dataloader(cfg: Config, split: str = 'test', num_images: Optional[int] = None,
                     batch_size: int = 1):
    """The config's ``{split}_dataloader``, in order, one process, first ``num_images``.

    Args:
        cfg: the config.
        split: ``'test'`` or ``'val'``.
        num_images: keep the first ``num_images`` of the dataset (``None``: all).
        batch_size: images per batch.
    """
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    dl_cfg = cfg.get(f'{split}_dataloader')
    if not dl_cfg:
        raise ValueError(f'the config has no {split}_dataloader')
    if num_images is not None and (isinstance(num_images, bool) or num_images <= 0):
        raise ValueError(f'num_images must be a positive integer, got {num_images!r}')
    if batch_size <= 0:
        raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')
    dl_cfg = ConfigDict(copy.deepcopy(dl_cfg))
    dl_cfg.update(batch_size=batch_size, num_workers=0, persistent_workers=False,
                  sampler=dict(type='DefaultSampler', shuffle=False))
    if num_images is not None:
        dl_cfg.dataset.indices = num_images
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    return Runner.build_dataloader(dl_cfg)


def iter_batches(dataloader, num_images: Optional[int] = None) -> Iterator[dict]:
    """Batches of ``dataloader`` until ``num_images`` images were yielded (the last batch
    is cut if needed).

    Args:
        dataloader: any iterable of ``{'inputs': [...], ...}`` batches.
        num_images: images wanted (``None``: all).
    """
    seen = 0
    for batch in dataloader:
        if num_images is not None and seen >= num_images:
            return
        if num_images is not None and seen + len(batch['inputs']) > num_images:
            keep = num_images - seen
            batch = {k: v[:keep] for k, v in batch.items()}
        seen += len(batch['inputs'])
        yield batch


def _resized_pipeline(pipeline: Sequence[dict], size: Sequence[int],
                      keep_annotations: bool) -> List[dict]:
    """Loading steps of ``pipeline``, then an exact resize to ``size = (H, W)``, then its
    packing step."""
    loads = [copy.deepcopy(t) for t in pipeline if str(t['type']).startswith('Load')
             and (keep_annotations or t['type'] == 'LoadImageFromFile')]
    return loads + [dict(type='Resize', scale=(int(size[1]), int(size[0])), keep_ratio=False),
                    copy.deepcopy(pipeline[-1])]


def single_image_batch(cfg: Config, image: Optional[str] = None, index: Optional[int] = None,
                       size: Optional[Sequence[int]] = None, split: str = 'test') -> dict:
    """One image as a dataloader batch (``{'inputs': [...], 'data_samples': [...]}``).

    ``image``: a file, run through the config's ``{split}`` pipeline without its
    annotation loading (``ValueError`` when it is not an image); else the dataset item
    ``index`` (default 0, ground truth included). ``size=(H, W)`` replaces the
    pipeline's geometric steps by an exact resize to ``H × W``.

    Args:
        cfg: the config.
        image: path of an image file, or ``None``.
        index: dataset index (``None``: 0), when no ``image`` is given.
        size: ``(H, W)`` or ``None``.
        split: ``'test'`` or ``'val'`` (whose pipeline / dataset is used).
    """
    if image is not None and index is not None:
        raise ValueError('give an image file or a dataset index, not both')
    if size is not None and (len(size) != 2 or min(size) <= 0):
        raise ValueError(f'size must be two positive integers (H W), got {size!r}')
    dl_cfg = cfg.get(f'{split}_dataloader')
    if not dl_cfg:
        raise ValueError(f'the config has no {split}_dataloader')
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    pipeline = list(dl_cfg['dataset']['pipeline'])
    if image is not None:
        if not osp.isfile(image):
            raise FileNotFoundError(f'image not found: {image}')
        steps = (_resized_pipeline(pipeline, size, keep_annotations=False) if size else
                 [t for t in pipeline if not str(t['type']).startswith('LoadAnnotations')])
        try:  # mmcv's LoadImageFromFile asserts on a file it cannot decode
            item = Compose(steps)(dict(img_path=image))
        except AssertionError as exc:
            raise ValueError(f'image {image} cannot be read ({exc})') from None
    else:
        dataset_cfg = copy.deepcopy(dl_cfg['dataset'])
        if size:
            dataset_cfg['pipeline'] = _resized_pipeline(pipeline, size, keep_annotations=True)
        dataset = DATASETS.build(dataset_cfg)
        index = 0 if index is None else index
        if not -len(dataset) <= index < len(dataset):
            raise ValueError(f'index {index} is out of range for the {split} dataset of '
                             f'{len(dataset)} images')
        item = dataset[index]
    return pseudo_collate([item])


@torch.no_grad()
def forward_tensor(model: nn.Module, batch: dict) -> dict:
    """Preprocess a dataloader batch with the model's data preprocessor and run the plain
    forward (``mode='tensor'``). Returns the preprocessed ``{'inputs', 'data_samples'}``
    (the network's own output is not needed by the analyses).

    Args:
        model: an mmseg segmentor or mmpretrain classifier (or their wrappers).
        batch: a dataloader batch.
    """
    model = unwrap(model)
    data = model.data_preprocessor(batch, False)
    model(data['inputs'], data.get('data_samples'), mode='tensor')
    return data
