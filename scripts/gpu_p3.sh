#!/bin/bash
# Issue 6 P3 and the GPU test suites, run on the device machine from the repo root (docs/PERF.md):
# pytest -m gpu for kernels, quantization and offload; Llama-3-8B dims int4 (and nf4) vs bf16 at
# batch 1 and with 64 requests in flight, in one run. `QUANTS="none nf4" bash scripts/gpu_p3.sh
# --no-tests` runs a subset.
. scripts/gpu_setup.sh
[ "$1" != "--no-tests" ] && python3 -m pytest -q -m gpu tests/test_kernels_triton.py tests/test_kernels_attention.py tests/test_kernels_gemv.py tests/test_quant.py tests/test_offload.py tests/test_swap.py > $OUT/pytest.log 2>&1; tail -3 $OUT/pytest.log
C64="--concurrency 64 --num-requests 128 --input-len 100:1024 --output-len 100:1024 --seed 0 --ignore-eos"
for q in ${QUANTS:-none int4 nf4}; do
  S=""; [ $q != none ] && S="--set quantization=$q"
  bash -c "$D bench profiles/llama-3-8b-h100.yaml --batch-1 $S" > $OUT/p3-$q-b1.log 2>&1; echo "$q batch-1: $(grep -E 'decode' $OUT/p3-$q-b1.log | tail -1)"
  bash -c "$D bench profiles/llama-3-8b-h100.yaml $C64 $S" > $OUT/p3-$q-c64.log 2>&1; echo "$q c64: $(grep -E 'output tok/s|rror' $OUT/p3-$q-c64.log | tail -1)"
done
