"""Training-side additions to mmengine (registered on import)."""
from .amp import BF16AmpOptimWrapper, configure_amp
from .optimizers import LION_AVAILABLE

__all__ = ['BF16AmpOptimWrapper', 'LION_AVAILABLE', 'configure_amp']
