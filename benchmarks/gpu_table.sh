#!/usr/bin/env bash
# The GPU rows of docs/performance.md in one run (about 8 minutes on an H200, kit included: docs/performance.md).
#
#   bash benchmarks/gpu_table.sh [LOG]        # LOG: default gpu_table.log; every bench's lines go there
#
# Environment:
#   PYTHON        interpreter (default: python3, else python)
#   STEPS         the steps to run, in order (default: all): attention exact train extract tunes clamp3 mert
#                 profile compile (exact: the reference-vector tests on the device; not in a smoke run)
#   COMPILE=1     adds the --compile runs (training, extraction, MERT)
#   SMOKE=1       the same steps on the CPU at tiny sizes, seconds each: proves the script and every bench's
#                 arguments before device time is spent (tests/test_gpu_table.py runs it)
#   STEP_TIMEOUT  seconds per step (default 240); a step that fails or times out is reported and the rest run
#   CACHE         where the benches' corpus caches live (default /tmp)
#   KIT           offline kit made by benchmarks/gpu_kit.py (default benchmarks/.kit; none with SMOKE=1). When it exists, its wheels
#                 are installed into a private folder put first on PYTHONPATH, with the repository itself, and its
#                 caches are unpacked into CACHE: a GPU node without internet and without music21 runs every step.
#
# The table's numbers are the lines repeated at the end. Exactness: tests/test_attention.py (sdpa == eager in
# fp32; bf16 cosine), and each bench_extract line compares its features with the first fp32 run of its path.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
LOG=${1:-gpu_table.log}
STEPS=${STEPS-attention exact train extract tunes clamp3 mert profile compile}
SMOKE=${SMOKE:-0}
CACHE=${CACHE:-/tmp}
# A smoke run uses a kit only when KIT names one: the default kit holds the GPU machine's wheels (Python 3.12).
KIT=${KIT:-$([ "$SMOKE" = 1 ] || echo benchmarks/.kit)}
COMPILE_FLAG=$([ "${COMPILE:-0}" = 1 ] && echo --compile || true)
: > "$LOG"
say() { echo "$*" | tee -a "$LOG"; }
run() { say "== $*"; timeout "${STEP_TIMEOUT:-240}" "$@" 2>&1 | tee -a "$LOG" || say "!! failed or timed out: $*"; }
wants() { [[ " $STEPS " == *" $1 "* ]]; }

if [ -n "$KIT" ] && [ -d "$KIT" ]; then
  if compgen -G "$KIT/wheels/*.whl" > /dev/null; then
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/clamp2_kit_site.XXXXXX")
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$KIT"/wheels/*.whl
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    say "kit: $(ls "$KIT"/wheels | wc -l) wheels installed into $SITE"
  fi
  if [ -f "$KIT/data.tgz" ]; then
    mkdir -p "$CACHE" && tar xzf "$KIT/data.tgz" -C "$CACHE"
    say "kit: caches unpacked into $CACHE ($(tar tzf "$KIT/data.tgz" | grep -c -v '/$') files)"
  fi
fi
TRAIN_DATA=$CACHE/clamp2_bench_train
MUSIC_DATA=$CACHE/clamp2_bench_music
AUDIO_DATA=$CACHE/clamp2_bench_audio
TUNES=${ABC_TUNES_DIR:-$CACHE/abc_tunes}
# MERT's timing does not depend on what the audio is: without music21's chorales, seeded tones do.
MERT_AUDIO=$("$PYTHON" -c "import music21" 2>/dev/null && echo chorales || echo synthetic)

if [ "$SMOKE" = 1 ]; then
  say "smoke run on the CPU at tiny sizes: $("$PYTHON" -c "import torch; print('torch', torch.__version__)")"
else
  "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"
  "$PYTHON" -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|tokenizers|huggingface.hub|accelerate|numpy) " | tee -a "$LOG" || true
fi

# Fail early, and say which import broke, before any step's time is spent.
"$PYTHON" -c "import clamp2, transformers, mido, soundfile, unidecode; print('imports ok: transformers', transformers.__version__, 'from', transformers.__file__)" 2>&1 | tee -a "$LOG" \
  || { say "!! imports failed: give the missing packages through benchmarks/gpu_kit.py's wheels"; exit 1; }

if wants attention; then
  run "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_attention.py
fi
if wants exact && [ "$SMOKE" != 1 ]; then
  # The reference-vector tests on the GPU: the scripts and the API pick CUDA when it is there, so fp32 features
  # computed on the device (M3, CLaMP 2, CLaMP 3 with MERT) must equal the original's within the tests' 1e-5.
  # (On the CPU the suite itself runs them; about 30 s here.)
  run "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_extract.py tests/test_extract_clamp3.py tests/test_api.py \
      tests/test_api_clamp3.py -k "reference or reproduce or batching or tf32"
fi
if wants train; then
  # M3, CLaMP 2 and CLaMP 3's two stages at config.py's sizes and batches, bf16 autocast.
  if [ "$SMOKE" = 1 ]; then
    run "$PYTHON" benchmarks/bench_train.py --device cpu --configs small --variants m3 clamp2 clamp3s clamp3a \
        --steps 1 --warmup 1 --threads 2 --scores 6 --data "$TRAIN_DATA" --m3_decode_groups
  else
    run "$PYTHON" benchmarks/bench_train.py --device cuda --precision bf16 --variants m3 clamp2 clamp3s clamp3a \
        --steps 8 --warmup 3 --data "$TRAIN_DATA" $COMPILE_FLAG
    # M3's decoder in length groups instead of one full-length pass: the next M3 change, if it is faster.
    run "$PYTHON" benchmarks/bench_train.py --device cuda --precision bf16 --variants m3 --m3_decode_groups \
        --steps 8 --warmup 3 --data "$TRAIN_DATA"
  fi
fi
if wants extract; then
  # Extraction of music (M3 per-position, CLaMP 2 --normalize): fp32 and bf16, batch 16 vs a token budget.
  if [ "$SMOKE" = 1 ]; then
    run "$PYTHON" benchmarks/bench_extract.py --device cpu --dtypes fp32 --batch_sizes 4 --batch_tokens 2048 \
        --files 8 --reference_files 0 --patch_length 128 --layers 2 --threads 2 --data "$MUSIC_DATA"
  else
    run "$PYTHON" benchmarks/bench_extract.py --device cuda --dtypes fp32 bf16 --batch_sizes 16 --batch_tokens 16384 \
        --files 200 --reference_files 0 --data "$MUSIC_DATA" $COMPILE_FLAG
  fi
fi
if wants tunes; then
  # The issue's short-piece corpus: music21's 12,978 ABC tunes, interleaved (on the CPU) unless the kit brought them.
  if [ "$SMOKE" = 1 ]; then
    TUNE_ARGS=(--music_dir tests/data/vectors/extract_in --files 0 --device cpu --threads 2 --patch_length 128 --layers 2)
    run "$PYTHON" benchmarks/bench_extract.py "${TUNE_ARGS[@]}" --dtypes fp32 --batch_sizes 4 --batch_tokens 2048 \
        --reference_files 0 --num_workers 1
  else
    if [ ! -d "$TUNES/interleaved" ]; then
      run "$PYTHON" benchmarks/bench_abc_corpus.py --out "$TUNES"
    fi
    # Features on tmpfs where there is one, as the host table of docs/performance.md.
    SCRATCH=${SCRATCH:-$([ -d /dev/shm ] && [ -w /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}")}
    TUNE_ARGS=(--music_dir "$TUNES/interleaved" --files 0 --device cuda --files_per_chunk 4096 --num_workers 8
               --scratch "$SCRATCH")
    run "$PYTHON" benchmarks/bench_extract.py "${TUNE_ARGS[@]}" --dtypes fp32 bf16 --batch_sizes 64 \
        --batch_tokens 16384 --reference_files 0 $COMPILE_FLAG
  fi
  # The host's ceiling on the same tunes (a model that returns zeros): what bounds short pieces. Each line ends
  # with where the main process waited (tokenizing workers, writers, ...); the second run doubles both pools.
  run "$PYTHON" benchmarks/bench_extract.py "${TUNE_ARGS[@]}" --host_only --batch_sizes 64 --reference_files 0
  if [ "$SMOKE" != 1 ]; then
    run "$PYTHON" benchmarks/bench_extract.py "${TUNE_ARGS[@]}" --host_only --batch_sizes 64 --reference_files 0 \
        --num_workers 14 --writer_threads 8
  fi
fi
if wants clamp3; then
  # CLaMP 3 extraction, symbolic and audio, global features (published sizes).
  if [ "$SMOKE" = 1 ]; then
    run "$PYTHON" benchmarks/bench_extract_clamp3.py --device cpu --dtype fp32 --batch_size 4 --batch_tokens 2048 \
        --symbolic_files 4 --audio_files 2 --global_only --threads 2 --data "$MUSIC_DATA"
  else
    run "$PYTHON" benchmarks/bench_extract_clamp3.py --device cuda --dtype bf16 --batch_size 64 --batch_tokens 16384 \
        --symbolic_files 100 --audio_files 100 --global_only --data "$MUSIC_DATA"
  fi
fi
if wants mert; then
  # MERT-v1-95M's sizes, batched 5-s windows, fp32 and bf16.
  if [ "$SMOKE" = 1 ]; then
    run "$PYTHON" benchmarks/bench_mert.py --device cpu --size tiny --files 2 --seconds 10 --batch_size 4 \
        --dtypes fp32 --skip_reference --threads 2 --num_workers 0 --audio "$MERT_AUDIO" --data "$AUDIO_DATA" \
        --resample_on_device
  else
    # 32 minutes of audio, 8 decoding workers (one measured 375 s of audio/s: the bound of the last run);
    # the host-alone lines say whether decoding still bounds it, and the driver runs again resampling on the GPU.
    run "$PYTHON" benchmarks/bench_mert.py --device cuda --size full --files 32 --seconds 60 --batch_size 32 \
        --num_workers 8 --dtypes fp32 bf16 --skip_reference --audio "$MERT_AUDIO" --data "$AUDIO_DATA" \
        --resample_on_device $COMPILE_FLAG
  fi
fi

if wants profile; then
  # Where a training step's time goes (torch.profiler, CPU and CUDA): the evidence for the next MFU change.
  if [ "$SMOKE" = 1 ]; then
    run "$PYTHON" benchmarks/bench_train.py --device cpu --configs small --variants m3 --steps 1 --warmup 1 \
        --threads 2 --scores 6 --data "$TRAIN_DATA" --profile
  else
    run "$PYTHON" benchmarks/bench_train.py --device cuda --precision bf16 --variants m3 clamp2 --steps 3 --warmup 3 \
        --data "$TRAIN_DATA" --profile
  fi
fi

if wants compile; then
  # CLaMP 2 and M3 training through torch.compile (inductor): fusing the dtype casts and layer norms the profiles
  # show is the next MFU lever. Last, so that a lease running out loses only this step; the warm-up steps compile.
  if [ "$SMOKE" = 1 ]; then
    run "$PYTHON" benchmarks/bench_train.py --device cpu --configs small --variants clamp2 m3 --steps 1 --warmup 1 \
        --threads 2 --scores 6 --data "$TRAIN_DATA" --compile --compile_backend eager
  else
    run "$PYTHON" benchmarks/bench_train.py --device cuda --precision bf16 --variants clamp2 m3 --steps 8 --warmup 3 \
        --data "$TRAIN_DATA" --compile
  fi
fi

say "== table lines"
grep -E "passed|failed|samples/s|files/s|s of audio/s|MFU|keeps pace" "$LOG" | grep -v "^==" || true
if grep -q "^!! failed" "$LOG"; then exit 1; fi
