#!/usr/bin/env bash
# Every speed figure of the issue on one GPU, with real shapes; under 8 minutes on an H200.
#
#   bash benchmarks/gpu_suite.sh                   # JSON files + suite.log into $OUT (default runs/bench/gpu)
#   bash benchmarks/gpu_suite.sh --fetch-wheels    # once, on a machine with pip access: megatron-core into .whl/
#   SUITE_SMOKE=1 OUT=/tmp/s bash benchmarks/gpu_suite.sh   # the same plumbing on CPU with tiny shapes (~2 min)
#
# Needs python3 with CUDA torch, transformers and triton. megatron-core 0.19 is installed from .whl/
# into /tmp/atpo_site when it does not import (GPU images without network). Each step has its own
# time limit and the whole suite stops starting steps after SUITE_BUDGET_S (default 450 s); a failed
# step is reported and the rest still run. The last section prints every figure against its target.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p .whl
  exec $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d .whl megatron-core==0.19.2
fi

OUT=${OUT:-runs/bench/gpu}
mkdir -p "$OUT"
LOG="$OUT/suite.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! $PY -c "import megatron.core" 2>/dev/null; then
  if compgen -G ".whl/megatron_core-*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/atpo_site .whl/*.whl | tee -a "$LOG"
    export PYTHONPATH="$PYTHONPATH:/tmp/atpo_site"
  else
    echo "megatron-core does not import and .whl/ has no wheel: run 'bash benchmarks/gpu_suite.sh --fetch-wheels'" \
         "where pip works and bring .whl/ along" | tee -a "$LOG"
  fi
fi
$PY -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | tee -a "$LOG"

BUDGET=${SUITE_BUDGET_S:-450}
START=$SECONDS
FAILED=()
step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if ((left < 20)); then echo "=== $name: skipped, suite budget spent" | tee -a "$LOG"; FAILED+=("$name(skipped)"); return; fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit}s, at $((SECONDS - START))s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | grep -v -E "Warning|warnings.warn|DEPRECATED|^\s*$" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc $rc in $((SECONDS - t0))s" | tee -a "$LOG"
  ((rc == 0)) || FAILED+=("$name(rc $rc)")
}

if [[ ${SUITE_SMOKE:-0} == 1 ]]; then  # a CPU run of this script's plumbing with tiny shapes
  FP8=(--preset cpu --loss-steps 4 --repeat 1 --warmup 0)
  ROLLOUT=(--model tiny --batch 2 --prompt-len 8 --new-tokens 8 --tree 2,1,2 --turns 3 --turn-tokens 24)
  SYNC=(--model tiny --repeat 1)
  IPC=()
  LOSS=(--sequences 2 --tokens 128)
  A13=(--preset tiny --attention both --steps 1 --warmup 0)
  A8S=(--preset tiny --attention sdpa --steps 1 --warmup 0)
  A8U=(--preset tiny --attention unfused --steps 1 --warmup 0)
else
  FP8=(--preset h200)
  ROLLOUT=(--model 0.5b --batch 64 --prompt-len 256 --new-tokens 128 --engines hf,hf-static
           --tree 10,2,6 --prompts 2 --turns 4 --turn-tokens 64)
  SYNC=(--model 8b --repeat 3)
  IPC=(--ipc)  # the CUDA IPC transport into another process (what a vLLM worker in mp mode receives)
  LOSS=(--sequences 64 --tokens 8192 --turns 6)
  A13=(--preset 1.3b --optimizer sgd --attention both --steps 3 --warmup 1)
  A8S=(--preset 8b --optimizer sgd --attention sdpa --steps 3 --warmup 1)
  A8U=(--preset 8b --optimizer sgd --attention unfused --steps 2 --warmup 1)  # may run out of memory: its own step
fi

step fp8_linear 120 $PY benchmarks/fp8_linear.py "${FP8[@]}" --json "$OUT/fp8_linear.json"
step rollout 110 $PY benchmarks/rollout.py "${ROLLOUT[@]}" --json "$OUT/rollout.json"
step weight_sync 120 $PY benchmarks/weight_sync.py "${SYNC[@]}" "${IPC[@]}" --json "$OUT/weight_sync.json"
step loss 60 $PY benchmarks/loss.py "${LOSS[@]}" --json "$OUT/loss.json"
step actor_1.3b 120 $PY benchmarks/actor_step.py "${A13[@]}" --json "$OUT/actor_step_1.3b.json"
step actor_8b_sdpa 100 $PY benchmarks/actor_step.py "${A8S[@]}" --json "$OUT/actor_step_8b_sdpa.json"
step actor_8b_unfused 100 $PY benchmarks/actor_step.py "${A8U[@]}" --json "$OUT/actor_step_8b_unfused.json"

echo "=== summary ($((SECONDS - START))s)" | tee -a "$LOG"
$PY - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None
def line(what, value, target=""):
    print(f"{what:<58} {value:>22}  {target}")
f = load("fp8_linear")
if f:
    for r in f["layers"]:
        if r["variant"] != "bf16":
            line(f"FP8 linear fwd+bwd {r['shape']} {r['variant']}", f"{r['speedup_vs_bf16']:.2f}x bf16 ({r['tflops']:.0f} TF/s)",
                 "target >= 1.3x" if r["shape"] == "8192x4096x14336" and r["variant"] in ("fp8-tensorwise", "fp8-rowwise") else "")
    lc = f.get("loss_curve")
    if lc:
        line("FP8 loss curve vs bf16: largest relative gap", f"{100 * lc['max_relative_gap']:.2f}%")
        line(f"FP8 model step tokens/s over bf16 ({lc['model']} model)", f"{lc['step_speedup']:.2f}x")
r = load("rollout")
if r:
    for e in r["engines"]:
        line(f"rollout {r['args']['model']} batch {e['batch']} engine {e['engine']}", f"{e['tokens_per_s']:,.0f} tok/s",
             "target >= 30,000")
    t = r.get("tree_vs_chain")
    if t:
        line(f"tree vs chain, {t['tree']['leaves']} leaves: fewer tokens than chains", f"{100 * t['saving_vs_chain_run']:.1f}%",
             "target >= 30%")
        line("  fewer than chains to the tree's own leaves", f"{100 * t['saving_vs_chain_equivalent']:.1f}%",
             f"{t['tree']['turns_per_leaf']:.1f} turns/leaf, task {t['task']}")
        line("tree / chain wall time", f"{t['wall_ratio_tree_over_chain']:.2f}")
w = load("weight_sync")
if w:
    x = w["result"]
    line(f"weight sync {x['model']} ({x['gb']:.1f} GB) seconds", f"{x['sync_s']:.3f} s")
    line("weight sync GB/s of weights (N/t)", f"{x['weights_gb_per_s']:,.2f} GB/s")
    if x["weights_fraction_of_datasheet"] is not None:
        line("  N/t over datasheet bandwidth", f"{100 * x['weights_fraction_of_datasheet']:.0f}%", "target >= 50% (a copy caps at 50%)")
        line("  traffic 2N/t over datasheet bandwidth", f"{100 * x['traffic_fraction_of_datasheet']:.0f}%")
    line("  traffic 2N/t over measured copy rate", f"{100 * x['traffic_fraction_of_copy']:.0f}%")
    for t in w.get("transports", []):
        line(f"  transport {t['transport']}", f"{t['weights_gb_per_s']:,.2f} GB/s",
             f"2N/t = {100 * t['fraction_of_copy']:.0f}% of the copy rate")
l = load("loss")
if l:
    for x in l["results"]:
        line(f"loss {x['loss']} fwd+bwd per token", f"{x['us_per_token']:.4f} us", f"{x.get('over_plain', 0):.2f}x plain")
for name in ("actor_step_1.3b", "actor_step_8b_sdpa", "actor_step_8b_unfused"):
    a = load(name)
    if a:
        for x in a["results"]:
            t = x["train"]
            line(f"{name} {x['attention']} train", f"{t['tokens_per_s']:,.0f} tok/s {t['tflops_per_device']:.0f} TF/s",
                 f"MFU {100 * t['mfu']:.1f}%, peak {x['peak_memory_gib']:.1f} GiB")
EOF
if ((${#FAILED[@]})); then echo "failed or skipped: ${FAILED[*]}" | tee -a "$LOG"; exit 1; fi
echo "all steps passed in $((SECONDS - START))s" | tee -a "$LOG"
