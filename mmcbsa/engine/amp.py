"""Mixed-precision training through mmengine's optimizer wrappers, on GPUs and CPUs.

mmengine 0.10.7's ``AmpOptimWrapper`` (fp16 or bf16 autocast plus a
``torch.cuda.amp.GradScaler``) refuses to be built without a GPU/NPU/MLU/MUSA
device. CPU autocast supports bfloat16 only, and bfloat16 has float32's exponent
range, so it needs no loss scaling. :class:`BF16AmpOptimWrapper` is that case:
``AmpOptimWrapper``'s autocast context (mmengine's :func:`mmengine.runner.amp.autocast`)
with ``dtype=torch.bfloat16`` on the device the model lives on, and the plain
``OptimWrapper`` backward / step (no scaler). It runs on CPUs and on GPUs with
bfloat16 support.

float16 keeps mmengine's own ``AmpOptimWrapper`` with ``loss_scale='dynamic'``:
without loss scaling, fp16 gradients underflow (CBSA's input gradients of a small
model: 98 % become zero; docs/compile_and_amp.md).

:func:`configure_amp` is what ``tools/train.py --amp`` does with a config:

* CUDA available: ``AmpOptimWrapper`` with ``loss_scale='dynamic'`` (fp16 unless the
  config sets ``dtype``);
* no CUDA: ``BF16AmpOptimWrapper``; a config that already asks for
  ``AmpOptimWrapper`` (the ``-amp-`` configs) is switched to it as well, because
  mmengine cannot build ``AmpOptimWrapper`` there.
"""
from contextlib import contextmanager
from typing import Optional, Union

import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

__all__ = ['BF16AmpOptimWrapper', 'configure_amp']


def _model_device_type(model: nn.Module) -> str:
    """Device type (``'cpu'``, ``'cuda'``, ...) of the model's first parameter or
    buffer; ``'cpu'`` for a model without either."""
    for t in model.parameters():
        return t.device.type
    for t in model.buffers():
        return t.device.type
    return 'cpu'


@OPTIM_WRAPPERS.register_module()
class BF16AmpOptimWrapper(AmpOptimWrapper):
    """bfloat16 automatic mixed precision without loss scaling, on any device.

    Forward passes inside :meth:`optim_context` (mmengine's ``train_step`` runs the
    model's loss there) run under ``torch.autocast(device_type, torch.bfloat16)``,
    ``device_type`` being where the model's parameters live; parameters, gradients
    and optimizer states stay float32. ``backward`` and ``step`` are
    :class:`~mmengine.optim.OptimWrapper`'s (gradient clipping and accumulation
    included): bfloat16 has float32's exponent range, so gradients need no scaling.

    Config::

        optim_wrapper = dict(type='BF16AmpOptimWrapper',
                             optimizer=dict(type='AdamW', lr=1e-3))

    Args:
        dtype: only ``'bfloat16'`` / ``torch.bfloat16`` (the default) is accepted;
            float16 needs loss scaling, i.e. mmengine's ``AmpOptimWrapper``.
        **kwargs: :class:`~mmengine.optim.OptimWrapper` arguments (``optimizer``,
            ``clip_grad``, ``accumulative_counts``).
    """

    def __init__(self, dtype: Union[str, torch.dtype, None] = 'bfloat16', **kwargs) -> None:
        if dtype not in (None, 'bfloat16', torch.bfloat16):
            raise ValueError(f"BF16AmpOptimWrapper: dtype must be 'bfloat16', got {dtype!r} "
                             "(float16 needs loss scaling: use AmpOptimWrapper on a GPU)")
        # AmpOptimWrapper.__init__ would build a CUDA GradScaler (and asserts a GPU):
        # initialise the plain wrapper instead and keep only the autocast part.
        OptimWrapper.__init__(self, **kwargs)
        self.cast_dtype = torch.bfloat16
        self.loss_scaler = None
        self._scale_update_param = None

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        OptimWrapper.backward(self, loss, **kwargs)

    def step(self, **kwargs) -> None:
        OptimWrapper.step(self, **kwargs)

    def state_dict(self) -> dict:
        return OptimWrapper.state_dict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        state_dict.pop('loss_scaler', None)  # checkpoint of an fp16 AmpOptimWrapper run
        OptimWrapper.load_state_dict(self, state_dict)

    @contextmanager
    def optim_context(self, model: nn.Module):
        """:meth:`OptimWrapper.optim_context` (gradient accumulation) plus bfloat16
        autocast on the model's device."""
        from mmengine.runner.amp import autocast
        with OptimWrapper.optim_context(self, model), autocast(
                device_type=_model_device_type(model), dtype=torch.bfloat16):
            yield


def configure_amp(cfg: Config, enable: bool, cuda: Optional[bool] = None) -> Optional[str]:
    """Choose the mixed-precision optimizer wrapper of ``cfg`` for this machine (in place).

    Args:
        cfg: a training config with an ``optim_wrapper`` dict.
        enable: ``--amp`` was given: turn a plain ``OptimWrapper`` into a mixed-precision one.
        cuda: whether CUDA is available (default: ``torch.cuda.is_available()``).

    Returns:
        A one-line description of what was chosen (for the log), or ``None`` when the
        config was left as it was (no ``--amp`` and no ``AmpOptimWrapper`` on a CPU).

    Raises:
        ValueError: ``--amp`` without an ``optim_wrapper``, or with one that is neither
            ``OptimWrapper`` nor an AMP wrapper; a config asking for float16 on a CPU.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    wrapper = cfg.get('optim_wrapper', None)
    if wrapper is None:
        if enable:
            raise ValueError('--amp needs an optim_wrapper in the config')
        return None
    kind = wrapper.get('type', 'OptimWrapper')
    amp_kinds = ('AmpOptimWrapper', 'BF16AmpOptimWrapper')
    if enable and kind not in ('OptimWrapper', ) + amp_kinds:
        raise ValueError(f'--amp needs optim_wrapper.type "OptimWrapper", got "{kind}"')
    if not enable and kind != 'AmpOptimWrapper':
        return None
    if kind == 'BF16AmpOptimWrapper':
        return 'AMP: bfloat16 autocast, no loss scaling (BF16AmpOptimWrapper, from the config)'
    if cuda:
        if kind == 'AmpOptimWrapper':
            return (f"AMP: {wrapper.get('dtype') or 'float16'} autocast with loss scaling "
                    '(AmpOptimWrapper, from the config)')
        wrapper.type = 'AmpOptimWrapper'
        wrapper.setdefault('loss_scale', 'dynamic')
        return (f"AMP: {wrapper.get('dtype') or 'float16'} autocast with "
                f"{wrapper.loss_scale} loss scaling (AmpOptimWrapper)")
    dtype = wrapper.get('dtype', None)
    if dtype not in (None, 'bfloat16', torch.bfloat16):
        raise ValueError(f'optim_wrapper.dtype={dtype!r}: CPU autocast supports bfloat16 '
                         'only; remove dtype or train on a GPU')
    source = 'the config asks for AmpOptimWrapper, which needs a GPU; ' \
        if kind == 'AmpOptimWrapper' else ''
    wrapper.type = 'BF16AmpOptimWrapper'
    wrapper.pop('loss_scale', None)
    wrapper.pop('dtype', None)
    return (f'AMP on CPU: {source}bfloat16 autocast without loss scaling '
            '(BF16AmpOptimWrapper; float16 needs a GPU)')
