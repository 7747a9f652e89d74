#!/usr/bin/env bash
# The main job, end to end:
#   1. set up .venv (tools/setup_env.sh; quick when already done),
#   2. generate the synthetic mini ADE20K into data/mini_ade20k,
#   3. train DEPICT-SA on a tiny ViT encoder (CPU is fine),
#   4. evaluate it (mmseg IoUMetric) and save predicted masks + visualisations,
#   5. draw the compression curves: the coding rate CodingRateHook logged while training,
#      and trained against untrained per layer (tools/analysis_tools/coding_rate.py),
#   6. print the mIoU and where the checkpoint, the logs, a predicted mask and the curves are.
# Environment overrides: CONFIG, WORK_DIR, DATA_ROOT, EXTRA_ARGS (passed to train.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CONFIG="${CONFIG:-configs/depict/depict-sa_vit-tiny-p8_1xb8-300it_mini-ade20k-128x128.py}"
WORK_DIR="${WORK_DIR:-work_dirs/quickstart}"
DATA_ROOT="${DATA_ROOT:-data/mini_ade20k}"
PY="$ROOT/.venv/bin/python"
# One torch thread: the data loader worker uses the other core, and on a busy machine two
# spinning OpenMP threads per process are several times slower.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::UserWarning,ignore::DeprecationWarning}"

step() { echo; echo "==== [quickstart] $* ===="; }

# Runs "$@", keeping its whole output in file $1 and showing only the progress lines
# (mmengine's full logs are in the work directory as well). On failure: the output's tail.
run_logged() {
  local out=$1
  shift
  echo "[quickstart] full output: $out"
  set +e +o pipefail
  "$@" 2>&1 | tee "$out" | grep --line-buffered -E 'Iter\((train|val|test)\)'
  local rc=${PIPESTATUS[0]}
  set -e -o pipefail
  if [ "$rc" -ne 0 ]; then
    echo "[quickstart] FAILED (exit code $rc): $*" >&2
    tail -n 60 "$out" >&2
    exit "$rc"
  fi
}

step "1/5 environment"
t0=$SECONDS
bash tools/setup_env.sh
echo "[quickstart] set-up: $((SECONDS - t0)) s"

step "2/5 mini ADE20K -> $DATA_ROOT"
if [ -f "$DATA_ROOT/.complete" ]; then
  echo "[quickstart] already generated ($DATA_ROOT/.complete exists)"
else
  rm -rf "$DATA_ROOT"
  "$PY" tools/misc/make_mini_dataset.py --dataset ade20k --out "$DATA_ROOT" --seed 0
  touch "$DATA_ROOT/.complete"
fi

step "3/5 train ($CONFIG)"
rm -rf "$WORK_DIR"
mkdir -p "$WORK_DIR"
t0=$SECONDS
# shellcheck disable=SC2086
run_logged "$WORK_DIR/train_output.txt" "$PY" tools/train.py "$CONFIG" --work-dir "$WORK_DIR" \
  --cfg-options "train_dataloader.dataset.data_root=$DATA_ROOT" \
  "val_dataloader.dataset.data_root=$DATA_ROOT" "test_dataloader.dataset.data_root=$DATA_ROOT" \
  ${EXTRA_ARGS:-}
TRAIN_S=$((SECONDS - t0))
CKPT="$(cat "$WORK_DIR/last_checkpoint")"
TRAIN_LOG="$(ls -t "$WORK_DIR"/*/*.log | head -n1)"

step "4/5 test ($CKPT)"
t0=$SECONDS
mkdir -p "$WORK_DIR/test"
run_logged "$WORK_DIR/test/test_output.txt" "$PY" tools/test.py "$CONFIG" "$CKPT" --work-dir "$WORK_DIR/test" \
  --out "$WORK_DIR/test/pred_masks" --show-dir "$WORK_DIR/test/vis" \
  --cfg-options "test_dataloader.dataset.data_root=$DATA_ROOT"
TEST_S=$((SECONDS - t0))
TEST_LOG="$(ls -t "$WORK_DIR"/test/*/*.log | head -n1)"

step "5/5 compression curves"
t0=$SECONDS
ANALYSIS="$WORK_DIR/analysis"
run_logged "$ANALYSIS.txt" "$PY" tools/analysis_tools/coding_rate.py "$CONFIG" --checkpoint "$CKPT" \
  --compare-init --training-log "$WORK_DIR" --num-images 8 --out-dir "$ANALYSIS" \
  --cfg-options "test_dataloader.dataset.data_root=$DATA_ROOT"
CURVE_S=$((SECONDS - t0))
# what CodingRateHook cost during training: the seconds it printed per measurement
HOOK="$({ grep -o 'CodingRateHook: after .*(\([0-9.]*\) s)' "$TRAIN_LOG" || true; } \
  | sed 's/.*(\([0-9.]*\) s)$/\1/' | awk '{n++; s+=$1} END {printf "%d measurements, %.1f s", n, s}')"

MIOU="$(grep -o 'mIoU: [0-9.]*' "$TEST_LOG" | tail -n1 | cut -d' ' -f2)"
AACC="$(grep -o 'aAcc: [0-9.]*' "$TEST_LOG" | tail -n1 | cut -d' ' -f2)"
MASK="$(ls "$WORK_DIR"/test/pred_masks/*.png | head -n1)"
VIS="$(find "$WORK_DIR/test/vis" -name '*.png' | sort | head -n1)"
cat <<REPORT

==== [quickstart] result ====
mIoU (mini ADE20K val, mmseg IoUMetric): $MIOU   (aAcc: $AACC)
training time: ${TRAIN_S} s (CodingRateHook: $HOOK of it), test time: ${TEST_S} s, curves: ${CURVE_S} s
checkpoint:      $CKPT
training log:    $TRAIN_LOG
test log:        $TEST_LOG
predicted mask:  $MASK   (ADE label ids 1..150, one channel)
visualisation:   $VIS   (image+ground truth | image+prediction)
coding rate during training (CodingRateHook): $ANALYSIS/coding_rate_training.png (.csv)
coding rate, trained vs untrained, per layer: $ANALYSIS/coding_rate.png (.csv; learned_* = trained - init)
$(tail -n1 "$ANALYSIS.txt")
export to ONNX (docs/deployment.md): $PY tools/deployment/pytorch2onnx.py $CONFIG $CKPT --out $WORK_DIR/model.onnx --dynamic-shape --verify --cfg-options test_dataloader.dataset.data_root=$DATA_ROOT
REPORT
