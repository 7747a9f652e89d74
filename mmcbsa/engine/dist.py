"""Distributed training on CPU-only machines (gloo) with mmengine's Runner.

mmengine 0.10.x assumes a GPU per process when it launches distributed training:

* ``mmengine.dist.init_dist`` (called by ``Runner.setup_env``) runs
  ``torch.cuda.set_device(local_rank)`` for the ``pytorch``/``slurm``/``mpi``
  launchers, which raises on a machine without CUDA;
* ``Runner.wrap_model`` always passes ``device_ids=[LOCAL_RANK]`` to
  ``DistributedDataParallel`` subclasses, which DDP rejects for CPU modules.

The fix here is deliberately outside mmengine's code path and only active when CUDA
is unavailable:

1. :func:`init_cpu_dist` creates the default process group with the ``gloo`` backend
   from the launcher's environment (the same variables mmengine reads) *before* the
   Runner is built. ``Runner.setup_env`` only calls ``init_dist`` when
   ``not is_distributed()``, so it then leaves the existing group alone.
2. :func:`configure_cpu_distributed` points ``cfg.model_wrapper_cfg`` at
   :class:`MMCPUDistributedDataParallel`, a registered ``MMDistributedDataParallel``
   that drops ``device_ids``/``output_device`` for CPU modules, and sets
   ``cfg.env_cfg.dist_cfg.backend = 'gloo'`` so that the logged and dumped config
   names the backend actually in use (mmseg's and mmpretrain's runtime bases say
   ``'nccl'``; the Runner logs ``env_cfg`` verbatim).
3. :class:`CPUDistributedRunner` is mmengine's ``Runner`` with one change to its
   start-up log: ``Runner._log_env`` reports the world size under the hard-coded
   name ``GPU number`` (mmengine 0.10.x, no option); on the CPU path that line reads
   ``World size (CPU processes): N`` instead. ``tools/train.py``/``tools/test.py``
   build it (:func:`mmcbsa.cli.build_runner`) when the CPU path is
   active and the config names no ``runner_type``.

With CUDA present none of this is active and the stock GPU path is untouched. The
system information mmengine logs (``collect_env``) still lists torch's build
settings, e.g. ``USE_NCCL=ON``: a fact about the torch binary, not about the run.
"""
import atexit
import datetime
import logging
import os
import subprocess
from typing import Optional

import torch
import torch.distributed as torch_dist
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS
from mmengine.runner import Runner

__all__ = [
    'MMCPUDistributedDataParallel', 'CPUDistributedRunner', 'init_cpu_dist',
    'configure_cpu_distributed', 'setup_cpu_distributed'
]

CPU_BACKEND = 'gloo'


@MODEL_WRAPPERS.register_module()
class MMCPUDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` that also wraps CPU modules.

    ``Runner.wrap_model`` injects ``device_ids=[LOCAL_RANK]`` into every
    ``DistributedDataParallel`` subclass; for a module whose parameters live on the
    CPU those ids (and ``output_device``) are dropped, as DDP requires. For a CUDA
    module everything is passed through unchanged.
    """

    def __init__(self, module: torch.nn.Module, **kwargs) -> None:
        devices = {p.device.type for p in module.parameters()}
        if devices <= {'cpu'}:
            kwargs.pop('device_ids', None)
            kwargs.pop('output_device', None)
        super().__init__(module=module, **kwargs)


class _RenameInRecord(logging.Filter):
    """Logger filter that replaces ``old`` by ``new`` in the message of each record."""

    def __init__(self, old: str, new: str) -> None:
        super().__init__()
        self.old, self.new = old, new

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and self.old in record.msg:
            record.msg = record.msg.replace(self.old, self.new)
        return True


class CPUDistributedRunner(Runner):
    """mmengine ``Runner`` for the CPU (gloo) distributed path.

    Identical to ``Runner`` except for one line of the environment report written
    at construction: mmengine's ``Runner._log_env`` names the world size
    ``GPU number`` whatever the device; here the same value is reported as
    ``World size (CPU processes)``. Everything else (system information, runtime
    environment, the config) is mmengine's own text.
    """

    def _log_env(self, env_cfg: dict) -> None:
        rename = _RenameInRecord('GPU number:', 'World size (CPU processes):')
        self.logger.addFilter(rename)
        try:
            super()._log_env(env_cfg)
        finally:
            self.logger.removeFilter(rename)


# what each launcher's process starter sets (for mpi the user sets MASTER_ADDR)
_LAUNCHER_ENV = {
    'pytorch': ('torchrun', ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')),
    'slurm': ('srun', ('SLURM_PROCID', 'SLURM_NTASKS')),
    'mpi': ('mpirun and export MASTER_ADDR',
            ('OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_LOCAL_RANK',
             'MASTER_ADDR')),
}


def _launcher_env(launcher: str, port: Optional[int] = None) -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT like mmengine does; a
    ``KeyError`` naming the launcher and the variables its process starter did not set."""
    if launcher not in _LAUNCHER_ENV:
        raise ValueError(f'launcher must be one of pytorch, slurm, mpi; got {launcher!r}')
    starter, needed = _LAUNCHER_ENV[launcher]
    if launcher == 'slurm' and 'MASTER_ADDR' not in os.environ:
        needed += ('SLURM_NODELIST', )
    missing = [k for k in needed if k not in os.environ]
    if missing:
        raise KeyError(f'launcher="{launcher}" needs the environment variables {missing}, '
                       f'which are not set (start the processes with {starter}, or use '
                       '--launcher none)')
    if launcher == 'slurm':
        proc_id = int(os.environ['SLURM_PROCID'])
        os.environ['RANK'] = str(proc_id)
        os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
        os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', '0')
        if port is not None:
            os.environ['MASTER_PORT'] = str(port)
        os.environ.setdefault('MASTER_PORT', '29500')
        if 'MASTER_ADDR' not in os.environ:
            node_list = os.environ['SLURM_NODELIST']
            os.environ['MASTER_ADDR'] = subprocess.getoutput(
                f'scontrol show hostname {node_list} | head -n1')
    elif launcher == 'mpi':
        os.environ['RANK'] = os.environ['OMPI_COMM_WORLD_RANK']
        os.environ['WORLD_SIZE'] = os.environ['OMPI_COMM_WORLD_SIZE']
        os.environ['LOCAL_RANK'] = os.environ['OMPI_COMM_WORLD_LOCAL_RANK']
        os.environ.setdefault('MASTER_PORT', '29500')


def init_cpu_dist(launcher: str, timeout: Optional[float] = None,
                  port: Optional[int] = None) -> bool:
    """Create the default ``gloo`` process group when CUDA is unavailable.

    Args:
        launcher: ``'none'``, ``'pytorch'``, ``'slurm'`` or ``'mpi'``.
        timeout: seconds, as in mmengine's ``env_cfg.dist_cfg.timeout``.
        port: master port (``slurm`` only, like mmengine's ``dist_cfg.port``).

    Returns:
        ``True`` if this call created the group; ``False`` if nothing was done
        (``launcher='none'``, CUDA available, or a group already exists).
    """
    if launcher == 'none' or torch.cuda.is_available():
        return False
    if torch_dist.is_available() and torch_dist.is_initialized():
        return False
    _launcher_env(launcher, port)
    kwargs = {}
    if timeout is not None:
        kwargs['timeout'] = datetime.timedelta(seconds=timeout)
    torch_dist.init_process_group(
        backend=CPU_BACKEND, init_method='env://', rank=int(os.environ['RANK']),
        world_size=int(os.environ['WORLD_SIZE']), **kwargs)
    # Destroy the group we created before the interpreter shuts down: left to the C++
    # destructors at exit, gloo's threads can abort the process after a finished run
    # ("terminate called without an active exception", seen once in CI).
    atexit.register(_destroy_group)
    return True


def _destroy_group() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def configure_cpu_distributed(cfg) -> bool:
    """Make ``cfg`` describe the CPU (gloo) run (only when CUDA is unavailable).

    Sets ``cfg.env_cfg.dist_cfg.backend = 'gloo'`` (other ``dist_cfg`` keys such as
    ``timeout`` are kept; mmengine's ``init_dist`` is not reached on this path since
    the group already exists, so the key only makes the logged config truthful) and
    ``cfg.model_wrapper_cfg`` to :class:`MMCPUDistributedDataParallel` with the
    arguments mmengine's default wrapper would use (``broadcast_buffers=False``,
    ``find_unused_parameters`` from the config). A user ``model_wrapper_cfg`` of type
    ``MMDistributedDataParallel`` keeps its arguments and only changes its type; any
    other user wrapper is left alone.

    Returns:
        whether ``cfg`` was changed (``False`` without a launcher or with CUDA).
    """
    if cfg.get('launcher', 'none') == 'none' or torch.cuda.is_available():
        return False
    env_cfg = cfg.get('env_cfg', None)
    if env_cfg is None:
        cfg.env_cfg = dict(dist_cfg=dict(backend=CPU_BACKEND))
    elif env_cfg.get('dist_cfg', None) is None:
        env_cfg['dist_cfg'] = dict(backend=CPU_BACKEND)
    else:
        env_cfg['dist_cfg']['backend'] = CPU_BACKEND
    wrapper = cfg.get('model_wrapper_cfg', None)
    if wrapper is None:
        cfg.model_wrapper_cfg = dict(
            type='MMCPUDistributedDataParallel',
            broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    elif wrapper.get('type', 'MMDistributedDataParallel') == 'MMDistributedDataParallel':
        wrapper['type'] = 'MMCPUDistributedDataParallel'
    return True


def setup_cpu_distributed(cfg) -> bool:
    """:func:`init_cpu_dist` from ``cfg.launcher``/``cfg.env_cfg.dist_cfg`` followed by
    :func:`configure_cpu_distributed`. Call before ``Runner.from_cfg(cfg)``.

    Returns:
        whether the CPU (gloo) path is in use.
    """
    launcher = cfg.get('launcher', 'none')
    if launcher == 'none' or torch.cuda.is_available():
        return False
    dist_cfg = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}) or {})
    init_cpu_dist(launcher, timeout=dist_cfg.get('timeout'), port=dist_cfg.get('port'))
    configure_cpu_distributed(cfg)
    return True
