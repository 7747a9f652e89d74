from .version import __version__
from . import models  # noqa: F401,E402  (registers mmcbsa modules into mmseg/mmpretrain)
from . import engine  # noqa: F401,E402  (registers the Lion optimizer into mmengine)
from . import analysis  # noqa: F401,E402  (registers CodingRateHook into mmengine's HOOKS)
from .model_index import register_model_index  # noqa: E402
from .engine import register_mmengine_safe_globals  # noqa: E402

# torch>=2.6 loads with weights_only=True: allow-list what mmengine checkpoints hold.
register_mmengine_safe_globals()
# mmcbsa's model names in mmpretrain's ModelHub and mmseg's MMSegInferencer.
register_model_index()

__all__ = ['__version__']
