"""Watch compression during training: :class:`CodingRateHook` (docs/mechanisms.md §9)."""
import time
from typing import List, Optional

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from .measure import compression_scalars, measure_compression
from .runtime import build_dataloader, iter_batches, unwrap

__all__ = ['CodingRateHook']


@HOOKS.register_module()
class CodingRateHook(Hook):
    """Log per-layer coding rate and ISTA sparsity on a few fixed images while training.

    Every ``interval`` training iterations (and once before training starts), the
    model runs one extra forward pass, in eval mode and without gradients, on the first
    ``num_images`` images of the config's ``{split}_dataloader`` (loaded once, in
    order), and the mean over those images of each attention layer's coding rate
    (:func:`~mmcbsa.analysis.coding_rate`) and of its block's ISTA sparsity go to the
    message hub as ``train/coding_rate/<group>.<i>`` and ``train/sparsity/<group>.<i>``
    (``group``: ``backbone``, ``decode_head``, ``head``; ``i``: attention layer within it).
    mmengine's ``LoggerHook`` then writes them, with the loss and learning rate, into the
    text log, ``vis_data/scalars.json`` and every visualizer backend (TensorBoard,
    W&B): a logged value is the latest measurement, so choose ``interval`` as a multiple
    of the logger's interval. The measurement before training (the initialisation) is
    written to the visualizer backends directly, at step 0. The hook also prints one line
    per measurement, with the seconds it took (its whole cost).

    Enable it from a config::

        custom_hooks = [dict(type='CodingRateHook', interval=50, num_images=4)]

    or from the command line: ``tools/train.py CONFIG --coding-rate-hook 50``.

    Args:
        interval: measure every ``interval`` training iterations.
        num_images: images measured (the first of the dataset).
        split: ``'val'`` (default) or ``'test'`` dataloader of the config.
        eps: ``ε`` of the coding rate (0.01, as the reference).
        measure_at_start: also measure before the first iteration (the initialisation).
    """

    priority = 'NORMAL'  # before LoggerHook (BELOW_NORMAL): fresh values in the same iteration

    def __init__(self, interval: int = 50, num_images: int = 4, split: str = 'val',
                 eps: float = 0.01, measure_at_start: bool = True) -> None:
        for name, value in (('interval', interval), ('num_images', num_images)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f'CodingRateHook: {name} must be a positive integer, '
                                 f'got {value!r}')
        if split not in ('val', 'test'):
            raise ValueError(f"CodingRateHook: split must be 'val' or 'test', got {split!r}")
        self.interval, self.num_images, self.split = interval, num_images, split
        self.eps, self.measure_at_start = eps, measure_at_start
        self._batches: Optional[List[dict]] = None

    def _images(self, runner) -> List[dict]:
        if self._batches is None:
            loader = build_dataloader(runner.cfg, self.split, self.num_images)
            self._batches = list(iter_batches(loader, self.num_images))
        return self._batches

    def measure(self, runner, step: int) -> dict:
        """Measure now and log (``step``: training iterations done); returns the scalars
        (without the ``train/`` prefix)."""
        start = time.perf_counter()
        model = unwrap(runner.model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                layers = measure_compression(model, self._images(runner), self.eps)
        finally:
            model.train(was_training)
        if not layers:
            runner.logger.warning('CodingRateHook: the model has no attention layer with a '
                                  'known input projection (mmcbsa.analysis.MECHANISMS); '
                                  'nothing to log')
        scalars = compression_scalars(layers)
        for key, value in scalars.items():
            runner.message_hub.update_scalar(f'train/{key}', value)
        summary = ', '.join(
            f'{layer.label} {layer.coding_rate_mean_std[0]:.1f}'
            + (f' (sparsity {layer.sparsity_mean_std[0]:.3f})' if layer.sparsity else '')
            for layer in layers)
        seen = sum(len(batch['inputs']) for batch in self._images(runner))
        runner.logger.info(f'CodingRateHook: after {step} iterations, coding rate on '
                           f'{seen} {self.split} images: {summary} '
                           f'({time.perf_counter() - start:.2f} s)')
        return scalars

    def before_train(self, runner) -> None:
        if self.measure_at_start:
            scalars = self.measure(runner, runner.iter)
            # LoggerHook's first line comes after `interval` iterations: write the
            # initialisation's values to the visualizer backends directly, at this step
            runner.visualizer.add_scalars(scalars, step=runner.iter)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        if self.every_n_train_iters(runner, self.interval):
            self.measure(runner, runner.iter + 1)
