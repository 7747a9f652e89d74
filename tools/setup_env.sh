#!/usr/bin/env bash
# Creates (or refreshes) the virtual environment `.venv` at the repository root with the
# exact versions tested here (requirements/constraints.txt) and installs mmcbsa into it
# in editable mode. Safe to run repeatedly: a stamp file skips work already done.
#
# mmcv must be the full build (mmseg imports mmcv.ops). A prebuilt wheel is taken from
# ../shared/wheels (or $MMCV_WHEEL_DIR) when present; otherwise mmcv 2.1.0 is compiled
# from its sdist, which takes about 15 minutes on 2 CPU cores.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
WHEEL_DIR="${MMCV_WHEEL_DIR:-$ROOT/../shared/wheels}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
STAMP="$VENV/.mmcbsa-setup-$(cat "$CONSTRAINTS" setup.cfg pyproject.toml | sha1sum | cut -c1-12)"
if [ -f "$STAMP" ]; then
  echo "[setup] environment up to date ($VENV)"
  exit 0
fi

PIP_CMD=("$VPY" -m pip install --disable-pip-version-check -c "$CONSTRAINTS")
# pip warns once per call about find-links locations (e.g. a global PIP_FIND_LINKS) that do
# not exist on this machine; those lines are noise, everything else on stderr is kept.
pip_install() {
  "${PIP_CMD[@]}" "$@" 2> >(grep -v -E "^WARNING: Location '.*' is ignored" >&2)
}
PIP=(pip_install)
"${PIP[@]}" -q pip wheel "setuptools>=77.0.3,<82"
# The registry's torch (the CUDA build also runs on CPU); the local '+cpu' wheel has no
# matching torchvision, so it is excluded explicitly.
echo "[setup] installing torch / torchvision (first time: ~5 GB, a few minutes)"
"${PIP[@]}" -q "torch==2.13.0,!=2.13.0+cpu" "torchvision==0.28.0"
"${PIP[@]}" -q numpy ninja packaging addict yapf opencv-python Pillow pyyaml mmengine

FIND_LINKS=()
if ls "$WHEEL_DIR"/mmcv-*.whl >/dev/null 2>&1; then
  echo "[setup] installing mmcv from prebuilt wheel in $WHEEL_DIR"
  FIND_LINKS=(--find-links "$WHEEL_DIR")
else
  echo "[setup] no prebuilt mmcv wheel: compiling mmcv 2.1.0 CPU ops from source (~15 min on 2 cores)"
fi
MMCV_WITH_OPS=1 CFLAGS="${CFLAGS:--O1 -g0}" CXXFLAGS="${CXXFLAGS:--O1 -g0}" \
  "${PIP[@]}" -q --no-build-isolation "${FIND_LINKS[@]}" "mmcv==2.1.0"

echo "[setup] installing mmcbsa (editable) with the test and deploy (ONNX) extras"
"${PIP[@]}" -q --no-build-isolation -e ".[tests,deploy]"
"$VPY" -c "import mmcv.ops, mmseg, mmpretrain, mmcbsa, onnxruntime; print('[setup] ok: mmcv', mmcv.__version__, 'mmseg', mmseg.__version__, 'mmpretrain', mmpretrain.__version__)"
rm -f "$VENV"/.mmcbsa-setup-*
touch "$STAMP"
