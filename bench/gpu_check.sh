#!/usr/bin/env bash
# One prepared GPU run of the DSA selection work (about 8 minutes on an H100 / H200): the kernel tests,
# compiled, then the speed benchmark of every DSA entry with its baselines (naive XLA, the two-pass path,
# bf16 and fp8 matmul peaks, one read of the key cache) in one process. Writes under $OUT (default
# bench/results/gpu_check): tests.log, speed.json, speed.png, speed.log.
#
#   bash bench/gpu_check.sh                 # from the repository root, on the GPU machine
set -u
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
python -m pip install --no-deps --no-build-isolation -q -e . > "$OUT/install.log" 2>&1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/device.csv" 2>&1
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_dsa_streaming.py tests/test_pallas_selectors.py \
    > "$OUT/tests.log" 2>&1
echo "tests exit $?" >> "$OUT/tests.log"
timeout 300 sparse-index bench speed --lengths 8K,32K,128K,256K --max-seconds 270 --repeats 3 --quiet \
    --entries naive_xla,dsa,dsa_fp8,dsa_two_pass,dsa_sort_after,dsa_scoring,dsa_scoring_fp8,dsa_decode,dsa_decode_fp8,key_cache_read,key_cache_read_fp8 \
    --out "$OUT/speed.json" > "$OUT/speed.log" 2>&1
echo "bench exit $?" >> "$OUT/speed.log"
tail -n 40 "$OUT/tests.log" "$OUT/speed.log"
