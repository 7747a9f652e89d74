"""mmcbsa's models by name in OpenMMLab's APIs (the model index).

Every folder of ``configs/`` has a ``metafile.yml`` in the format of mmpretrain's and
mmseg's model indexes (``Collections`` with the paper; ``Models`` with ``Name`` = the
config's file name, ``Config``, ``Metadata`` — ``FLOPs`` (multiply-adds, counted by
``tools/analysis_tools/get_flops.py``) and ``Parameters`` —, ``Results`` = the papers'
reported numbers, ``Converted From`` = the authors' released weights); the root
``model-index.yml`` imports them. An installed mmcbsa carries both (and ``configs/``)
under ``mmcbsa/.mim/`` (copied at build time by ``setup.py``, like mmpretrain's and
mmseg's packages); in a source checkout or an editable install the repository root is
used.

``import mmcbsa`` calls :func:`register_model_index`, which makes the names usable
without touching mmpretrain's or mmseg's installed files:

* **mmpretrain**: models whose result task is ``Image Classification`` are added to
  mmpretrain's ``ModelHub``, so ``mmpretrain.list_models('cbt*')``,
  ``mmpretrain.get_model(NAME)``, ``mmpretrain.inference_model(NAME, image)`` and
  ``ImageClassificationInferencer(NAME)`` find them. (``ModelHub.register_model_index``
  takes a whole index file and would also register the segmentors, which
  ``get_model`` cannot build; so the classification entries are added to the hub's
  table with the same config-path expansion, and re-registering is a no-op.)
* **mmseg**: ``MMSegInferencer(model=NAME, weights=CKPT)`` resolves a name through
  mmengine's ``BaseInferencer._load_model_from_metafile``, which only reads the
  ``model-index.yml`` of the ``mmseg`` package directory and has no registration
  hook. mmcbsa therefore wraps that method on ``MMSegInferencer`` (only there): a name
  of an mmcbsa ``Semantic Segmentation`` model resolves to its config (and weights,
  when the metafile names any); every other name goes to mmseg's own lookup
  unchanged. This is the one monkeypatch in mmcbsa, applied once and tested
  (``tests/test_model_index.py``).

Names never collide with mmpretrain's or mmseg's own (tested).
"""
import fnmatch
import functools
import os.path as osp
import warnings
from typing import List, Optional, Tuple

__all__ = [
    'INDEX_FILE', 'CLS_TASK', 'SEG_TASK', 'index_root', 'load_models', 'list_models',
    'get_metainfo', 'model_tasks', 'register_model_index', 'register_mmpretrain_models',
    'register_mmseg_models'
]

INDEX_FILE = 'model-index.yml'
CLS_TASK = 'Image Classification'
SEG_TASK = 'Semantic Segmentation'


def index_root() -> str:
    """Directory holding ``model-index.yml`` and ``configs/``: ``mmcbsa/.mim`` in an
    installed package, else the repository root of a source checkout."""
    package = osp.dirname(osp.abspath(__file__))
    for root in (osp.join(package, '.mim'), osp.dirname(package)):
        if osp.isfile(osp.join(root, INDEX_FILE)) and osp.isdir(osp.join(root, 'configs')):
            return root
    raise FileNotFoundError(f'mmcbsa model index: no {INDEX_FILE} with configs/ in '
                            f'{osp.join(package, ".mim")} or {osp.dirname(package)}')


@functools.lru_cache(maxsize=None)
def _load(root: str) -> tuple:
    from modelindex.load_model_index import load
    index = load(osp.join(root, INDEX_FILE))
    index.build_models_with_collections()
    models = tuple(index.models)
    for model in models:  # configs are relative to the index root (mmpretrain/mmseg style)
        if model.config is not None and not osp.isabs(model.config):
            model.config = osp.normpath(osp.join(root, model.config))
    return models


def load_models(root: Optional[str] = None) -> tuple:
    """All models of mmcbsa's index (``modelindex`` ``Model`` objects in the order of
    ``model-index.yml`` and the metafiles, collection fields merged in, ``config`` an
    absolute path). Do not modify them: they are cached.

    Args:
        root: directory holding ``model-index.yml``; default :func:`index_root`.
    """
    return _load(osp.abspath(root) if root is not None else index_root())


def model_tasks(model) -> List[str]:
    """The ``Task`` of each of a model's ``Results``."""
    return [result.task for result in (model.results or [])]


def list_models(pattern: str = '*', task: Optional[str] = None) -> List[str]:
    """Sorted names of mmcbsa's models matching the wildcard ``pattern`` (a trailing
    ``*`` is implied, as in ``mmpretrain.list_models``) and, if given, a result task
    (:data:`CLS_TASK`, :data:`SEG_TASK`)."""
    names = [m.name for m in load_models()
             if task is None or task in model_tasks(m)]
    return sorted(fnmatch.filter(names, pattern + '*'))


def get_metainfo(name: str, task: Optional[str] = None):
    """The model called ``name`` (case-insensitive), or ``None``."""
    for model in load_models():
        if model.name.lower() == name.lower() and (task is None or task in model_tasks(model)):
            return model
    return None


def register_mmpretrain_models() -> List[str]:
    """Add mmcbsa's classification models to mmpretrain's ``ModelHub``; idempotent.

    Returns the names added by this call (empty when they were already there). A name
    already taken by a model from another index is left alone, with a warning.
    """
    from mmpretrain.apis import ModelHub
    added = []
    for model in load_models():
        if CLS_TASK not in model_tasks(model):
            continue
        key = model.name.lower()
        current = ModelHub._models_dict.get(key)
        if current is not None:
            if current.filepath != model.filepath:
                warnings.warn(f'mmcbsa model index: {model.name!r} is already registered '
                              f'from {current.filepath}; keeping that one')
            continue
        ModelHub._models_dict[key] = model
        added.append(model.name)
    return added


def _weights_of(model) -> Optional[str]:
    weights = model.weights
    return weights[0] if isinstance(weights, (list, tuple)) else weights


def register_mmseg_models() -> bool:
    """Let ``MMSegInferencer(model=NAME)`` resolve mmcbsa's segmentation models;
    idempotent. Returns ``True`` when the lookup was installed by this call."""
    from mmseg.apis import MMSegInferencer
    original = MMSegInferencer._load_model_from_metafile
    if getattr(original, '_mmcbsa_lookup', False):
        return False

    @functools.wraps(original)
    def _load_model_from_metafile(self, model: str) -> Tuple[object, Optional[str]]:
        meta = get_metainfo(model, task=SEG_TASK)
        if meta is None:
            return original(self, model)
        from mmengine.config import Config
        return Config.fromfile(meta.config), _weights_of(meta)

    _load_model_from_metafile._mmcbsa_lookup = True
    _load_model_from_metafile._mmcbsa_original = original
    MMSegInferencer._load_model_from_metafile = _load_model_from_metafile
    return True


def register_model_index() -> None:
    """Register mmcbsa's names with mmpretrain and mmseg (called by ``import mmcbsa``).

    A missing or unreadable index is reported with a warning, never an import error.
    """
    try:
        load_models()
    except (FileNotFoundError, OSError, ValueError) as exc:
        warnings.warn(f'mmcbsa model index not registered: {exc}')
        return
    register_mmpretrain_models()
    register_mmseg_models()
