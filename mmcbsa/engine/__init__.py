"""Additions to mmengine's training and loading machinery (registered on import): the
bfloat16 AMP wrapper, the Lion optimizer, the CPU (gloo) distributed launch, the
allow-list that lets ``torch.load(weights_only=True)`` read mmengine checkpoints, and the
check that a checkpoint fits a model."""
from .amp import BF16AmpOptimWrapper, configure_amp
from .dist import (MMCPUDistributedDataParallel, configure_cpu_distributed, init_cpu_dist,
                   setup_cpu_distributed)
from .optimizers import LION_AVAILABLE
from .safe_globals import mmengine_safe_globals, register_mmengine_safe_globals
from .weights import (Checkpoint, check_weights, class_count_problem, fit_problem,
                      load_weights, load_weights_only, read_checkpoint, read_state_dict)

__all__ = [
    'BF16AmpOptimWrapper', 'LION_AVAILABLE', 'configure_amp', 'MMCPUDistributedDataParallel',
    'configure_cpu_distributed', 'init_cpu_dist', 'setup_cpu_distributed',
    'mmengine_safe_globals', 'register_mmengine_safe_globals', 'check_weights',
    'class_count_problem', 'fit_problem',
    'load_weights', 'load_weights_only', 'Checkpoint', 'read_checkpoint', 'read_state_dict'
]
