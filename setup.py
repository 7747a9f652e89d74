"""Build hook: an installed mmcbsa carries its model index.

Package metadata lives in setup.cfg / pyproject.toml. This file only extends
``build_py`` so that a wheel (or a regular, non-editable install) gets
``mmcbsa/.mim/{model-index.yml, configs/}`` — the layout of mmpretrain's and mmseg's
packages, read by ``mmcbsa.model_index.index_root``. Editable installs and source
checkouts read the repository root instead, so nothing is copied for them.
"""
import os
import os.path as osp
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

MIM_FILES = ('model-index.yml', )
MIM_DIRS = ('configs', )


class BuildPyWithMim(build_py):
    """``build_py`` that also copies the model index into ``<build_lib>/mmcbsa/.mim``."""

    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):
            return
        here = osp.dirname(osp.abspath(__file__))
        target = osp.join(self.build_lib, 'mmcbsa', '.mim')
        if osp.isdir(target):
            shutil.rmtree(target)
        os.makedirs(target)
        for name in MIM_FILES:
            shutil.copy2(osp.join(here, name), osp.join(target, name))
        for name in MIM_DIRS:
            shutil.copytree(osp.join(here, name), osp.join(target, name),
                            ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))


setup(cmdclass={'build_py': BuildPyWithMim})
