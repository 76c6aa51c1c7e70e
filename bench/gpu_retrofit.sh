#!/usr/bin/env bash
# The SmolLM2 retrofit at 8K on one GPU, in one prepared run of under 9 minutes (sized for an H100 / H200; each
# distillation is time-boxed by --time-limit, so a slower device stops early, says so, and still writes):
#
#   1. new DSA-shaped indexers (16 heads x 32, MISA's 1/4 regime) distilled at 8,192 tokens from scratch:
#      dense warm-up, then the sparse stage (batches of 2 x 8K = 16K tokens, as the 2K run's 8 x 2K), on the
#      standard library with its packages (3M tokens: 360 sequences of 8K, where the top-level files give 120);
#   2. training-aware IndexCache: those indexers distilled further with the uniform 1/4 pattern (each F layer
#      learns the attention of the three S layers after it as well: the multi-layer loss);
#   3. `bench niah` (passkey, 2K-8K, 5 depths, 2 prompts per cell): dense, DSA, HISA, MISA, MISA-H, IndexCache
#      1/4 uniform training-free and trained;
#   4. `bench fidelity --model smollm2` at 8K on 8 held-out sequences (masses, agreement, cross-layer IoU, LM
#      losses with standard errors, the searched and the trained IndexCache patterns).
#
# Files under $OUT (default bench/results/retrofit_8k; at most 8, as the device tool brings back): indexers.safetensors,
# indexers_indexcache4.safetensors, metrics.jsonl (both runs, a "run" field each), niah.json/.png,
# fidelity_8k.json/.png, log.txt. Work folders (checkpoints) go to $WORK (default /tmp/retrofit_8k).
# Step counts and limits are variables: WARMUP=300 SPARSE=100 MINUTES=3 (training time of run 1), IC_WARMUP=60
# IC_SPARSE=20 IC_MINUTES=1, and TOTAL=530 (seconds for everything: each later step gets what is left, at most its
# own cap, so the fidelity report is what a slow device loses first).
set -u
OUT=${OUT:-bench/results/retrofit_8k}
WORK=${WORK:-/tmp/retrofit_8k}
WARMUP=${WARMUP:-300}; SPARSE=${SPARSE:-100}; MINUTES=${MINUTES:-3}
IC_WARMUP=${IC_WARMUP:-60}; IC_SPARSE=${IC_SPARSE:-20}; IC_MINUTES=${IC_MINUTES:-1}
TOTAL=${TOTAL:-530}
SEQ=${SEQ:-8192}; LENGTHS=${LENGTHS:-2K,4K,8K}   # a CPU plumbing check: SEQ=512 LENGTHS=512 WARMUP=2 CAP=5 ...
START=$(date +%s)
CAP=${CAP:-1}   # multiplies each step's own cap (a CPU plumbing check needs CAP=5)
left() {  # seconds left of TOTAL, at most $1 * CAP
  local rest=$(( TOTAL - ($(date +%s) - START) )) cap=$(( $1 * CAP ))
  echo $(( rest < cap ? (rest > 1 ? rest : 1) : cap ))
}
IX="$OUT/indexers.safetensors"; IC="$OUT/indexers_indexcache4.safetensors"
mkdir -p "$OUT" "$WORK"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1
{
  date -u
  python -m pip install --no-deps --no-build-isolation -q -e . 2>&1 | tail -n 3
  nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1
  python -c "import jax; print('jax', jax.__version__, jax.devices())"

  echo "== 1. distill 16 x 32 indexers at $SEQ tokens ($WARMUP + $SPARSE steps, at most $MINUTES min)"
  SECONDS=0
  timeout "$(left 400)" sparse-index distill --model smollm2 --indexers fresh --stdlib-packages --seq-len "$SEQ" \
      --batch-size 2 --warmup-steps "$WARMUP" --sparse-steps "$SPARSE" --warmup-lr 1e-3 --sparse-lr 2e-4 \
      --schedule cosine --save-every 100 --eval-batches 2 --time-limit "$MINUTES" --quiet --out "$WORK/full" \
      2>&1 | grep -v "^WARNING"
  echo "distill exit ${PIPESTATUS[0]} after $SECONDS s"
  cp "$WORK/full/indexers.safetensors" "$IX" || { echo "no indexers from step 1: nothing to evaluate"; exit 1; }

  echo "== 2. training-aware IndexCache 1/4 ($IC_WARMUP + $IC_SPARSE steps, at most $IC_MINUTES min)"
  SECONDS=0
  timeout "$(left 240)" sparse-index distill --model smollm2 --indexers "$IX" --every 4 --stdlib-packages \
      --seq-len "$SEQ" --batch-size 2 --warmup-steps "$IC_WARMUP" --sparse-steps "$IC_SPARSE" --warmup-lr 3e-4 \
      --sparse-lr 1e-4 --schedule cosine --save-every 100 --eval-batches 2 --time-limit "$IC_MINUTES" --quiet \
      --out "$WORK/ic4" 2>&1 | grep -v "^WARNING"
  echo "distill exit ${PIPESTATUS[0]} after $SECONDS s"
  IC_ARGS=()   # the trained IndexCache row, when step 2 wrote its indexers
  cp "$WORK/ic4/indexers.safetensors" "$IC" && IC_ARGS=(--indexcache-indexers "$IC")
  python - "$WORK" "$OUT/metrics.jsonl" <<'EOF'
import json, pathlib, sys
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
with out.open("w") as f:
    for run in ("full", "ic4"):
        if not (work / run / "metrics.jsonl").is_file():
            continue
        for line in (work / run / "metrics.jsonl").read_text().splitlines():
            f.write(json.dumps({"run": run, **json.loads(line)}) + "\n")
EOF

  echo "== 3. needle in a haystack"
  SECONDS=0
  timeout "$(left 120)" sparse-index bench niah --indexers "$IX" --lengths "$LENGTHS" \
      --depths 0,0.25,0.5,0.75,1 --trials 2 --batch-size 10 "${IC_ARGS[@]}" --quiet \
      --out "$OUT/niah.json" 2>&1 | grep -v "^WARNING"
  echo "niah exit ${PIPESTATUS[0]} after $SECONDS s"

  echo "== 4. fidelity at $SEQ tokens"
  SECONDS=0
  timeout "$(left 240)" sparse-index bench fidelity --model smollm2 --indexers "$IX" \
      --seq-len "$SEQ" --sequences 8 --search-batches 2 "${IC_ARGS[@]}" --quiet \
      --out "$OUT/fidelity_8k.json" 2>&1 | grep -v "^WARNING"
  echo "fidelity exit ${PIPESTATUS[0]} after $SECONDS s"
  date -u
} 2>&1 | tee "$LOG"
