"""Shared pytest helpers for mmcbsa's tests (CPU only)."""
import os
import sys
from pathlib import Path
from typing import List

import pytest
import torch

# Without a GPU, Triton kernels (mmcbsa.ops.cbsa_triton) run in Triton's CPU interpreter,
# which must be chosen before Triton is first imported (tests/test_triton_kernels.py).
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # lets test files `from conftest import ...`
    sys.path.insert(0, str(TESTS_DIR))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _cache_model_index_metafiles() -> None:
    """Parse each installed package's model-index metafiles once per test session.

    mmengine resolves every ``mmseg::`` / ``mmpretrain::`` base of a config by loading
    all of the package's ``.mim`` metafiles (about 200 YAML files for mmseg, ~1 s)
    before it falls back to the ``_base_`` path, on every ``Config.fromfile``. The files
    do not change during a test run, so their parsed content is cached (read-only use
    in mmengine); configs resolve exactly as before.
    """
    import functools

    import mmengine.config.utils as cfg_utils
    load = cfg_utils.load
    cached = functools.lru_cache(maxsize=None)(load)

    def load_metafile_once(file, *args, **kwargs):
        if (not args and not kwargs and isinstance(file, str) and '.mim' in file
                and file.endswith(('.yml', '.yaml'))):
            return cached(file)
        return load(file, *args, **kwargs)

    cfg_utils.load = load_metafile_once


_cache_model_index_metafiles()


def fixture_dir() -> Path:
    """Directory holding the official reference fixtures.

    ``$MMCBSA_OFFICIAL_FIXTURES`` when set, else ``tests/data/official``.
    """
    env = os.environ.get('MMCBSA_OFFICIAL_FIXTURES')
    return Path(env) if env else TESTS_DIR / 'data' / 'official'


def list_fixtures(prefix: str) -> List[Path]:
    """Fixture files whose name starts with ``prefix`` (sorted)."""
    return sorted(fixture_dir().glob(f'{prefix}*.pt'))


def fixture_params(prefix: str):
    """``pytest.param`` list over the fixtures of ``prefix``, each file's stem as id."""
    files = list_fixtures(prefix)
    if not files:
        # No silent pass: a missing fixture family is a failure, not a skip.
        return [pytest.param(None, id=f'missing-{prefix}')]
    return [pytest.param(p, id=p.stem) for p in files]


def load_fixture(path: Path) -> dict:
    assert path is not None, f'no official fixture found in {fixture_dir()}'
    return torch.load(path, map_location='cpu', weights_only=True)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a CUDA device: skipped, with the reason, without one.

    ``pytest -m cuda`` runs just that subset (tools/gpu_check.sh)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA device (torch.cuda.is_available() is False)')
    for item in items:
        if 'cuda' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolate_default_scope():
    """Each test starts from the default scope it found (none, normally).

    mmengine keeps the current ``DefaultScope`` in process-global state: a test that
    calls ``init_default_scope('mmpretrain')`` would otherwise make every later
    mmseg-only build (decode heads) resolve in mmpretrain's registry.
    """
    from mmengine.registry import DefaultScope
    saved = DefaultScope._instance_dict.copy()
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(saved)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after): on small tensors OpenMP's
    hand-offs between two threads dominate, 10x and more on a loaded 2-core machine.
    Use with ``pytestmark = pytest.mark.usefixtures('one_thread')``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
