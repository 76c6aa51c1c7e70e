#!/usr/bin/env bash
# One prepared GPU run (about 8 minutes on an H100 / H200), writing under $OUT (default bench/results/gpu_check):
#
#   bash bench/gpu_check.sh            # dsa: the DSA kernel tests, compiled, then `bench speed` of every DSA entry
#                                      #   with its baselines (naive XLA, two-pass, bf16/fp8 peaks, a key-cache read)
#   bash bench/gpu_check.sh selectors  # the selector kernel tests, compiled, then `bench speed` of DSA, HISA, MISA,
#                                      #   MISA-H at 16K-128K and `bench model` (a DeepSeek-V3.2-shaped stack)
#   bash bench/gpu_check.sh attention  # the sparse MLA / GQA kernel tests, compiled; `bench speed` of the attention
#                                      #   kernels and their XLA references at 4K-128K, the forward (and fwd+bwd)
#                                      #   at 256K, then the sparse MLA tile sweep at 8K (bench/attention_sweep.py)
#
# Files: install.log, device.csv, tests.log, speed.json/.png/.log (and model.json/.log for selectors;
# speed_256k.json/.log, mosaic_probe.json and sweep.json/.log for attention).
set -u
MODE=${1:-dsa}
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
python -m pip install --no-deps --no-build-isolation -q -e . > "$OUT/install.log" 2>&1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/device.csv" 2>&1
case "$MODE" in
  dsa)
    timeout 240 python -m pytest -q -p no:cacheprovider tests/test_dsa_streaming.py tests/test_pallas_selectors.py \
        > "$OUT/tests.log" 2>&1
    echo "tests exit $?" >> "$OUT/tests.log"
    timeout 300 sparse-index bench speed --lengths 8K,32K,128K,256K --max-seconds 270 --repeats 3 --quiet \
        --entries naive_xla,dsa,dsa_fp8,dsa_two_pass,dsa_sort_after,dsa_scoring,dsa_scoring_fp8,dsa_decode,dsa_decode_fp8,key_cache_read,key_cache_read_fp8 \
        --out "$OUT/speed.json" > "$OUT/speed.log" 2>&1
    echo "bench exit $?" >> "$OUT/speed.log"
    tail -n 40 "$OUT/tests.log" "$OUT/speed.log"
    ;;
  selectors)
    timeout 110 python -m pytest -q -p no:cacheprovider tests/test_listed_selection.py tests/test_pallas_selectors.py \
        > "$OUT/tests.log" 2>&1
    echo "tests exit $?" >> "$OUT/tests.log"
    timeout 150 sparse-index bench speed --lengths 128K,64K,32K,16K --max-seconds 120 --repeats 3 --quiet \
        --entries dsa,hisa,misa,misa_h --out "$OUT/speed.json" > "$OUT/speed.log" 2>&1
    echo "bench exit $?" >> "$OUT/speed.log"
    timeout 195 sparse-index bench model --lengths 128K,32K --repeats 1 --max-seconds 170 --out "$OUT/model.json" > "$OUT/model.log" 2>&1
    echo "model exit $?" >> "$OUT/model.log"
    tail -n 30 "$OUT/tests.log" "$OUT/speed.log" "$OUT/model.log"
    ;;
  attention)
    timeout 100 python -m pytest -q -p no:cacheprovider tests/test_sparse_mla_pallas.py tests/test_sparse_gqa_pallas.py \
        > "$OUT/tests.log" 2>&1
    echo "tests exit $?" >> "$OUT/tests.log"
    timeout 170 sparse-index bench speed --lengths 4K,32K,128K --max-seconds 150 --repeats 3 --quiet \
        --entries sparse_mla,sparse_mla_fwd_bwd,sparse_gqa,sparse_gqa_fwd_bwd,sparse_mla_xla,sparse_gqa_xla,sparse_mla_fwd_bwd_xla \
        --out "$OUT/speed.json" > "$OUT/speed.log" 2>&1
    echo "bench exit $?" >> "$OUT/speed.log"
    timeout 70 sparse-index bench speed --lengths 256K --max-seconds 50 --repeats 2 --quiet \
        --entries sparse_mla,sparse_mla_fwd_bwd --out "$OUT/speed_256k.json" > "$OUT/speed_256k.log" 2>&1
    echo "bench exit $?" >> "$OUT/speed_256k.log"
    timeout 30 python -m sparse_index_jax.bench.mosaic_gpu_gather_probe > "$OUT/mosaic_probe.json" 2>&1
    timeout 110 python -m sparse_index_jax.bench.attention_sweep --length 8192 --repeats 3 --out "$OUT/sweep.json" \
        > "$OUT/sweep.log" 2>&1
    echo "sweep exit $?" >> "$OUT/sweep.log"
    tail -n 30 "$OUT/tests.log" "$OUT/speed.log" "$OUT/speed_256k.log" "$OUT/mosaic_probe.json" "$OUT/sweep.log"
    ;;
  *)
    echo "gpu_check.sh: unknown mode '$MODE'; use dsa (default), selectors or attention" >&2
    exit 2
    ;;
esac
