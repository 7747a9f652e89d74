"""The Lion optimizer (Chen et al., 2023, "Symbolic Discovery of Optimization
Algorithms") for mmengine configs, used by the CBT recipe (docs/mechanisms.md §1: Lion, lr 2e-4,
weight decay 0.05).

mmengine/mmpretrain/torch ship no Lion, so the maintained ``lion-pytorch`` package is
registered into mmengine's root ``OPTIMIZERS`` registry under the name ``'Lion'``;
mmpretrain's and mmseg's registries resolve it through their parent, so configs write

.. code-block:: python

    optim_wrapper = dict(optimizer=dict(type='Lion', lr=2e-4, weight_decay=0.05))

``lion_pytorch.Lion`` applies weight decay decoupled from the gradient
(``p ← p·(1 − lr·wd)``), as in the paper.
"""
from mmengine.registry import OPTIMIZERS

try:
    from lion_pytorch import Lion
    LION_AVAILABLE = True
except ImportError:  # pragma: no cover - lion-pytorch is an install requirement
    Lion = None
    LION_AVAILABLE = False

if LION_AVAILABLE:
    if 'Lion' not in OPTIMIZERS.module_dict:
        OPTIMIZERS.register_module(name='Lion', module=Lion)
else:  # pragma: no cover
    def _missing_lion(*args, **kwargs):
        raise ImportError("optimizer 'Lion' needs the lion-pytorch package: "
                          'pip install lion-pytorch')

    if 'Lion' not in OPTIMIZERS.module_dict:
        OPTIMIZERS.register_module(name='Lion', module=_missing_lion)
