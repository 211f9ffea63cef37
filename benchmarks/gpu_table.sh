#!/usr/bin/env bash
# The GPU rows of docs/performance.md in one run (estimated 10–15 minutes on an H200, never run yet; not for the CPU).
#
#   bash benchmarks/gpu_table.sh [LOG]          # PYTHON=.venv/bin/python, COMPILE=1 adds the --compile runs
#
# Every bench prints its own lines into LOG (default gpu_table.log); the table's numbers are the lines
# repeated at the end. Exactness: tests/test_attention.py (sdpa == eager in fp32; bf16 cosine), and each
# bench_extract line compares its features with the first fp32 run of its path.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
LOG=${1:-gpu_table.log}
COMPILE_FLAG=$([ "${COMPILE:-0}" = 1 ] && echo --compile || true)
: > "$LOG"
run() { echo "== $*" | tee -a "$LOG"; timeout "${STEP_TIMEOUT:-240}" "$@" 2>&1 | tee -a "$LOG" || echo "!! failed or timed out: $*" | tee -a "$LOG"; }

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" | tee -a "$LOG"
run "$PYTHON" -m pytest -q tests/test_attention.py
# Training: M3, CLaMP 2 and CLaMP 3's two stages at config.py's sizes and batches, bf16 autocast.
run "$PYTHON" benchmarks/bench_train.py --device cuda --precision bf16 --variants m3 clamp2 clamp3s clamp3a \
    --steps 8 --warmup 3 $COMPILE_FLAG
# Extraction of music (M3 per-position, CLaMP 2 --normalize): fp32 and bf16, batch 16 vs a token budget.
run "$PYTHON" benchmarks/bench_extract.py --device cuda --dtypes fp32 bf16 --batch_sizes 16 --batch_tokens 16384 \
    --files 200 --reference_files 0 $COMPILE_FLAG
# The issue's short-piece corpus: music21's 12,978 ABC tunes, interleaved on the CPU first (ABC_TUNES=0 skips).
if [ "${ABC_TUNES:-1}" = 1 ]; then
  run "$PYTHON" benchmarks/bench_abc_corpus.py --out "${ABC_TUNES_DIR:-/tmp/abc_tunes}"
  run "$PYTHON" benchmarks/bench_extract.py --device cuda --dtypes fp32 bf16 --batch_sizes 64 --batch_tokens 16384 \
      --music_dir "${ABC_TUNES_DIR:-/tmp/abc_tunes}/interleaved" --files 0 --reference_files 0 --files_per_chunk 4096 \
      --num_workers 8 $COMPILE_FLAG
  # The host's ceiling on the same tunes (a model that returns zeros): what bounds short pieces.
  run "$PYTHON" benchmarks/bench_extract.py --device cuda --host_only --batch_sizes 64 \
      --music_dir "${ABC_TUNES_DIR:-/tmp/abc_tunes}/interleaved" --files 0 --reference_files 0 --files_per_chunk 4096 \
      --num_workers 8
fi
# CLaMP 3 extraction, symbolic and audio, global features, bf16.
run "$PYTHON" benchmarks/bench_extract_clamp3.py --device cuda --dtype bf16 --batch_size 64 --batch_tokens 16384 \
    --symbolic_files 100 --audio_files 100 --global_only
# MERT-v1-95M's sizes, batched 5-s windows, fp32 and bf16.
run "$PYTHON" benchmarks/bench_mert.py --device cuda --size full --files 8 --seconds 60 --batch_size 32 \
    --dtypes fp32 bf16 --skip_reference $COMPILE_FLAG

echo "== table lines" | tee -a "$LOG"
grep -E "passed|failed|samples/s|files/s|s of audio/s|MFU|keeps pace" "$LOG" | grep -v "^==" || true
