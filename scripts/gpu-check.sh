#!/usr/bin/env bash
# gpu-check.sh: everything this project checks only on a GPU, in one run (issue 11, item 4).
#
#   scripts/gpu-check.sh [--cpu] [--skip STEP,...] [--out DIR]
#
# Steps, each logged to DIR/STEP.log and summed up in DIR/summary.txt (DIR: --out, else $OUT,
# else ./gpu-check-out):
#   env    the python, torch, CUDA, GPUs and flash_attn in use (env.txt, nvidia-smi.txt)
#   tests  pytest -m cuda on tests/test_cuda.py and tests/test_cuda_varlen.py (if present; the
#          whole file when it does not use the cuda marker):
#          flash-attn and the SDPA varlen fallback against the padded path, bf16 steps,
#          train.compile=true without recompiles, 2-GPU DDP (skipped on one GPU); at least
#          one must pass and none fail
#   bench  neobert bench: NeoBERT (padding-free and padded), ModernBERT and BERT, bf16,
#          inference and training, fixed and variable lengths, 512 to 4096 tokens
#   smoke  200 pretraining steps of an 8 x 512 NeoBERT on the built-in corpus, bf16, rows
#          of 512, 64k-token batches: finite losses that go down by at least 1
# It exits 0 when every step passed, else 1 with one line on stderr naming the step and its
# log (2 for a bad argument).
#
# --cpu (or DEVICE=cpu): a dry mode that runs the same steps at reduced size on the CPU (the
# tests' CPU variants, a 2-layer bench, 20 steps of configs/debug.yaml), so the script itself
# is known to work on a machine without a GPU.
#
# A bare machine: the repository tree with a prebuilt .venv (make install) carried; the
# script uses $GPU_CHECK_PYTHON if set, else .venv/bin/python, when its torch sees a GPU (or
# in --cpu), else the first python3 on PATH whose torch does, with the sources on PYTHONPATH
# (no install). Nothing is downloaded: the hub is off (HF_HUB_OFFLINE=1), the tokenizer and
# corpus are packaged.
#
# Time on one H200, estimated from FLOPs (docs/scale.md, "The GPU path"):
# smoke 200 x 65,536 tokens x 195 MFLOP/token (3 x forward of the 8 x 512 model, attention
# and the sparse head included) = 2.6 PFLOP, about 30-60 s at 5-10% MFU (a small model is
# bound by kernel launches), plus about 20 s to tokenize the corpus; bench 64 rows of 7 steps
# of 32k tokens, at most 75 TFLOP a step (NeoBERT-base training at 4096), 1-3 minutes with
# model construction; tests 1-3 minutes (inductor compiles the debug model once). About 5
# minutes in all; each step is also capped (GPU_CHECK_TIMEOUT_TESTS, _BENCH, _SMOKE: 240, 150
# and 150 s on a GPU, 900 s each in --cpu on a loaded CPU) so a hang fails, not stalls.
set -uo pipefail

usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; }

MODE=gpu
[[ "${DEVICE:-}" == cpu ]] && MODE=cpu
SKIP=""
OUT_DIR="${OUT:-./gpu-check-out}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu) MODE=cpu; shift ;;
        --skip) [[ $# -ge 2 ]] || { echo "gpu-check: --skip needs a comma-separated list of steps (env, tests, bench, smoke)" >&2; exit 2; }
                SKIP=",$2,"; shift 2 ;;
        --out) [[ $# -ge 2 ]] || { echo "gpu-check: --out needs a directory" >&2; exit 2; }
               OUT_DIR="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu-check: unknown argument $1 (valid: --cpu, --skip STEP,..., --out DIR, --help)" >&2; exit 2 ;;
    esac
done
for s in ${SKIP//,/ }; do
    [[ "$s" =~ ^(tests|bench|smoke)$ ]] || { echo "gpu-check: --skip: unknown step $s (valid: tests, bench, smoke)" >&2; exit 2; }
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT_DIR" || { echo "gpu-check: cannot create $OUT_DIR" >&2; exit 1; }
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
SUMMARY="$OUT_DIR/summary.txt"
CACHE="${GPU_CHECK_CACHE:-$OUT_DIR/cache}"
START=$SECONDS
: > "$SUMMARY"
cd "$ROOT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

note() { echo "$*" | tee -a "$SUMMARY"; }
fail() {
    note "RESULT: FAIL after $((SECONDS - START)) s: $*"
    echo "gpu-check: FAILED: $*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------
# env: a python whose torch sees the GPU (or any torch with --cpu), and the package's imports

if [[ $MODE == gpu ]]; then
    TORCH_CHECK='import torch; assert torch.cuda.is_available()'
else
    TORCH_CHECK='import torch'
fi
PY=""
TRIED=""
for candidate in "${GPU_CHECK_PYTHON:-}" "$ROOT/.venv/bin/python" "$(command -v python3 || true)" "$(command -v python || true)"; do
    [[ -n "$candidate" && -x "$candidate" ]] || continue
    TRIED+=" $candidate"
    if "$candidate" -c "$TORCH_CHECK" >/dev/null 2>&1; then PY="$candidate"; break; fi
done
if [[ -z "$PY" ]]; then
    if [[ $MODE == gpu ]]; then
        fail "env: no python whose torch sees a CUDA device (tried:${TRIED:- none}); a CPU-only torch or no GPU (--cpu runs the dry mode)"
    fi
    fail "env: no python with torch (tried:${TRIED:- none})"
fi
MISSING="$("$PY" -c '
import importlib.util
need = ["neobert", "transformers", "tokenizers", "safetensors", "datatrove", "pytest", "matplotlib", "yaml"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))' 2>&1)"
[[ -z "$MISSING" ]] || fail "env: $PY lacks $MISSING (carry the repository's .venv, or install the package's dependencies)"

"$PY" - > "$OUT_DIR/env.txt" 2>&1 <<'EOF'
import platform, sys
import torch, transformers
from neobert.device import attention_implementation, flash_attn_available
print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}")
try:
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
except (OSError, StopIteration):
    cpu = platform.machine()
print(f"cpu: {cpu}, {torch.get_num_threads()} torch threads")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print(f"flash_attn usable: {flash_attn_available()}; pretraining in bf16 on {device} uses attn_implementation={attention_implementation(device, True)}")
EOF
[[ $? -eq 0 ]] || fail "env: the environment report failed (see $OUT_DIR/env.txt)"
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1
note "mode $MODE; $(head -1 "$OUT_DIR/env.txt")"
sed -n '2,$p' "$OUT_DIR/env.txt" | sed 's/^/  /' | tee -a "$SUMMARY"

# ---------------------------------------------------------------------------------------
# Steps

# time limits per step: a hang on the GPU fails inside a 10-minute command; a loaded CPU is slow
if [[ $MODE == gpu ]]; then TESTS_CAP=240 CAP=150; else TESTS_CAP=900 CAP=900; fi

# run_step NAME TIMEOUT CMD...: the command's output to NAME.log; a failure ends the script
run_step() {
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name: $*" > "$OUT_DIR/$name.log"
    timeout --kill-after=10 "$limit" "$@" >> "$OUT_DIR/$name.log" 2>&1
    rc=$?
    STEP_SECONDS=$((SECONDS - t0))
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        fail "$name: timed out after $limit s (see $OUT_DIR/$name.log)"
    elif [[ $rc -ne 0 ]]; then
        local last
        last="$(grep -v '^\s*$' "$OUT_DIR/$name.log" | tail -1 | cut -c1-200)"
        fail "$name: exit $rc: $last (see $OUT_DIR/$name.log)"
    fi
}

# check_step NAME PYTHON-CODE: a check of a step's outputs; prints the summary's figures, fails with its message
check_step() {
    local name=$1 figures
    figures="$("$PY" -c "$2" "$OUT_DIR" "$MODE" 2>&1)" || fail "$name: $(echo "$figures" | tail -1)"
    note "PASS $name ${STEP_SECONDS} s: $figures"
}

skipped() { [[ "$SKIP" == *",$1,"* ]] && note "SKIP $1 (--skip)"; }

# tests ----------------------------------------------------------------------------------
if ! skipped tests; then
    FILES=(tests/test_cuda.py)
    WHOLE=()  # a CUDA test file without the cuda marker runs whole: its GPU tests cannot be told apart
    if [[ -f tests/test_cuda_varlen.py ]]; then
        if grep -q "mark.cuda" tests/test_cuda_varlen.py; then FILES+=(tests/test_cuda_varlen.py); else WHOLE+=(tests/test_cuda_varlen.py); fi
    fi
    if [[ $MODE == gpu ]]; then
        MARK=(-m cuda)
    else  # the CPU variants; the dry-mode test runs this script, so not itself
        MARK=(-m "not cuda" --deselect tests/test_cuda.py::test_gpu_check_script_dry_mode)
    fi
    PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider)
    rm -f "$OUT_DIR"/tests*.xml
    if [[ ${#WHOLE[@]} -gt 0 ]]; then
        run_step tests "${GPU_CHECK_TIMEOUT_TESTS:-$TESTS_CAP}" bash -c "$(printf '%q ' "${PYTEST[@]}" "${FILES[@]}" "${MARK[@]}" \
            --junitxml="$OUT_DIR/tests.xml") && $(printf '%q ' "${PYTEST[@]}" "${WHOLE[@]}" --junitxml="$OUT_DIR/tests-whole.xml")"
    else
        run_step tests "${GPU_CHECK_TIMEOUT_TESTS:-$TESTS_CAP}" "${PYTEST[@]}" "${FILES[@]}" "${MARK[@]}" --junitxml="$OUT_DIR/tests.xml"
    fi
    check_step tests '
import sys, xml.etree.ElementTree as ET
from pathlib import Path
cases = [c for f in sorted(Path(sys.argv[1]).glob("tests*.xml")) for c in ET.parse(f).getroot().iter("testcase")]
failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
skipped = {c.get("name"): c.find("skipped").get("message", "") for c in cases if c.find("skipped") is not None}
passed = len(cases) - len(failed) - len(skipped)
if failed or passed == 0:
    sys.exit(f"{passed} passed, failed: {failed}, skipped: {sorted(skipped)}")
print(f"{passed} passed, {len(skipped)} skipped" + "".join(f"\n  skipped {n}: {m}" for n, m in sorted(skipped.items())))'
fi

# bench ----------------------------------------------------------------------------------
if ! skipped bench; then
    if [[ $MODE == gpu ]]; then
        BENCH=(--device cuda --seq-lens 512,1024,2048,4096 --dtype bf16 --batch-tokens 32768 --warmup 2 --iters 5)
    else
        BENCH=(--device cpu --tiny --seq-lens 32 --dtype fp32 --batch-tokens 128 --warmup 0 --iters 1)
    fi
    run_step bench "${GPU_CHECK_TIMEOUT_BENCH:-$CAP}" "$PY" -m neobert bench "${BENCH[@]}" --mode inference,train \
        --lengths fixed,variable --json "$OUT_DIR/bench.json" --plot "$OUT_DIR/bench.png"
    check_step bench '
import json, sys
out, mode = sys.argv[1:3]
rows = json.load(open(out + "/bench.json"))
models = {"neobert-base", "neobert-base-padded", "modernbert-base", "bert-base"}
longest = max(r["seq_len"] for r in rows)
missing = models - {r["model"] for r in rows if r["seq_len"] == longest}
if missing:
    sys.exit(f"no rows at {longest} tokens for {sorted(missing)}")
if mode == "gpu" and any(not r["device"].startswith("cuda") for r in rows):
    sys.exit("rows measured off the GPU")
if any(not r["tokens_per_s"] > 0 for r in rows):
    sys.exit("a row measured no throughput")
pick = {(r["model"], r["mode"]): r for r in rows if r["seq_len"] == longest and r["lengths"] == "variable"}
parts = []
for m in ("train", "inference"):
    neo, modern = pick[("neobert-base", m)], pick[("modernbert-base", m)]
    tps, kernel, mfu, ratio = neo["tokens_per_s"], neo["attention"], neo["mfu"], neo["tokens_per_s"] / modern["tokens_per_s"]
    parts.append(f"{m} variable {longest}: NeoBERT {tps:,.0f} tok/s ({kernel}, MFU {mfu:.0%}), {ratio:.2f}x ModernBERT")
print(f"{len(rows)} rows; " + "; ".join(parts))'
fi

# smoke ----------------------------------------------------------------------------------
if ! skipped smoke; then
    rm -rf "$OUT_DIR/smoke-run"
    if [[ $MODE == gpu ]]; then
        SMOKE=(configs/tiny.yaml model.hidden_size=512 model.num_hidden_layers=8 model.num_attention_heads=8
               model.intermediate_size=2048 model.max_length=512 data.max_length=512 train.max_steps=200
               train.batch_tokens=65536 train.micro_batch_size=64 train.lr=1e-3 train.warmup_steps=20
               train.eval_every=100 train.eval_batches=8 train.save_every=100 train.log_every=10 train.device=cuda)
        DROP=1.0
    else
        SMOKE=(configs/debug.yaml train.max_steps=20 train.device=cpu)
        DROP=0.3
    fi
    run_step smoke "${GPU_CHECK_TIMEOUT_SMOKE:-$CAP}" "$PY" -m neobert pretrain "${SMOKE[@]}" train.bf16=true \
        "train.output_dir=$OUT_DIR/smoke-run" "data.cache_dir=$CACHE"
    check_step smoke "
import json, math, statistics, sys
records = [json.loads(line) for line in open(sys.argv[1] + '/smoke-run/metrics.jsonl')]
train = [r for r in records if 'loss' in r]
losses = [r['loss'] for r in train]
if not losses or not all(math.isfinite(x) for x in losses):
    sys.exit(f'non-finite or no losses: {losses[:5]}...')
k = max(1, len(losses) // 10)
first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
if not first - last >= $DROP:
    sys.exit(f'loss did not go down by $DROP: {first:.3f} over the first {k} logged steps, {last:.3f} over the last {k}')
tps = statistics.median(r['tokens_per_s'] for r in train[1:] or train)
mfu = [r['mfu'] for r in train[1:] if 'mfu' in r]
accuracy = [r['eval_accuracy'] for r in records if 'eval_accuracy' in r]
steps = train[-1]['step']
print(f'{steps} steps, loss {first:.3f} -> {last:.3f}, {tps:,.0f} tokens/s'
      + (f', MFU {statistics.median(mfu):.1%}' if mfu else '')
      + (f', held-out accuracy {accuracy[-1]:.2%}' if accuracy else ''))"
fi

TOTAL=$((SECONDS - START))
if [[ $MODE == gpu && $TOTAL -gt 480 ]]; then
    note "note: $TOTAL s is over the 8-minute budget"
fi
note "RESULT: PASS in $TOTAL s ($OUT_DIR)"
