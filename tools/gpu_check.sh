#!/usr/bin/env bash
# The GPU check (docs/compile_and_amp.md), one command on a machine with CUDA:
#   bash tools/gpu_check.sh            # under 6 minutes on one H100-class GPU
# 1. the CUDA tests: pytest -m cuda (every attention in fp32 / bf16 / fp16 on CUDA
#    against the CPU, CBSA's Triton kernels and hand-written backward, MiTA's masked
#    and grouped paths without host synchronisation, fp16 loss scaling);
# 2. the attention benchmark on CUDA in bf16 at 65,536 tokens per batch, N = 1024 ...
#    65536, with the linear-attention floor, MiTA on its automatic (masked) path and on
#    its grouped path (benchmark_attention.py);
# 3. training throughput at 512x512 in bf16 through mmengine's Runner: the CBT and
#    DEPICT-SA heads on Segmenter ViT-S, CBT-S + CBT head against Segmenter ViT-S, CBT-S
#    against DeiT-S (train_throughput.py);
# 4. inference: batch-1 latency and batch-32 throughput of CBT-S + CBT head against
#    Segmenter ViT-S at 512² (eager with CBSA's Triton core and with its PyTorch core,
#    and compiled with CUDA graphs) and 1024² (eager),
#    CBT-S against DeiT-S at 512² (train_throughput.py --mode inference);
# then one summary table with the speed targets and whether each holds (also in
# $OUT_DIR/gpu_check.md).
# Without CUDA, step 1 reports its tests as skipped (with the reason), steps 2 and 3
# print a skip line, and the table says what did not run. Exit status: 0 unless a step
# that ran failed.
# Environment: OUT_DIR (default work_dirs/gpu_check), GPU_CHECK_TESTS (pytest target,
# default tests), BENCH_ARGS / THROUGHPUT_ARGS / INFERENCE_ARGS (extra arguments of
# steps 2, 3 and 4).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR=${OUT_DIR:-work_dirs/gpu_check}
TESTS=${GPU_CHECK_TESTS:-tests}
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR/pytest_cuda.xml" "$OUT_DIR/benchmark_attention/benchmark_attention.csv" \
    "$OUT_DIR/train_throughput/train_throughput.csv" "$OUT_DIR"/inference*/inference_throughput.csv

CUDA=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')
if [ "$CUDA" = 1 ]; then
    "$PYTHON" -c 'import torch; print("[gpu_check] CUDA device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'
else
    echo "[gpu_check] no CUDA device (torch.cuda.is_available() is False): CPU-side checks only"
fi
status=0
start=$SECONDS

echo "[gpu_check] 1/4 pytest -m cuda $TESTS"
"$PYTHON" -m pytest "$TESTS" -m cuda -q -rs -p no:cacheprovider \
    --junitxml "$OUT_DIR/pytest_cuda.xml" || status=$?

echo "[gpu_check] 2/4 benchmark_attention.py --devices cuda --dtype bfloat16 (at $((SECONDS - start)) s)"
if [ "$CUDA" = 1 ]; then
    # shellcheck disable=SC2086
    "$PYTHON" tools/analysis_tools/benchmark_attention.py --devices cuda --dtype bfloat16 \
        --tokens-per-batch 65536 --n-list 1024 4096 16384 65536 --max-quadratic-n 65536 \
        --mechanisms CBSA AdaptedCBSA TSSA MiTA MiTA:path=grouped --repeat 7 \
        --out-dir "$OUT_DIR/benchmark_attention" ${BENCH_ARGS:-} || status=$?
else
    echo "[gpu_check] skipped: benchmark_attention.py --devices cuda needs a CUDA device"
fi

echo "[gpu_check] 3/4 train_throughput.py (bf16, 512x512, mmengine Runner) (at $((SECONDS - start)) s)"
if [ "$CUDA" = 1 ]; then
    # shellcheck disable=SC2086
    "$PYTHON" tools/analysis_tools/train_throughput.py --device cuda --dtype bfloat16 \
        --work-dir "$OUT_DIR/train_throughput" ${THROUGHPUT_ARGS:-} || status=$?
else
    echo "[gpu_check] skipped: train_throughput.py --device cuda needs a CUDA device"
fi

echo "[gpu_check] 4/4 train_throughput.py --mode inference (bf16; 512² compiled, 1024²) (at $((SECONDS - start)) s)"
if [ "$CUDA" = 1 ]; then
    TT=(tools/analysis_tools/train_throughput.py --mode inference --device cuda --dtype bfloat16)
    # shellcheck disable=SC2086
    "$PYTHON" "${TT[@]}" --models cbt-s-cbt-head --compile --cbsa-path auto torch \
        --work-dir "$OUT_DIR/inference_seg512" ${INFERENCE_ARGS:-} || status=$?
    # shellcheck disable=SC2086
    "$PYTHON" "${TT[@]}" --models cbt-s-cbt-head --img-size 1024 --inference-batch 8 \
        --work-dir "$OUT_DIR/inference_seg1024" ${INFERENCE_ARGS:-} || status=$?
    # shellcheck disable=SC2086
    "$PYTHON" "${TT[@]}" --models cbt-s \
        --work-dir "$OUT_DIR/inference_cls512" ${INFERENCE_ARGS:-} || status=$?
else
    echo "[gpu_check] skipped: train_throughput.py --mode inference needs a CUDA device"
fi

echo "[gpu_check] summary ($((SECONDS - start)) s)"
"$PYTHON" tools/analysis_tools/gpu_check_report.py "$OUT_DIR"
exit $status
