#!/bin/bash
# Issue 5 measurement set, run on the device machine from the repo root (see docs/PERF.md):
# e2e correctness, both models' workload and batch-1 benches, start-up-to-serving of Llama-3-8B.
. scripts/gpu_setup.sh
W="--num-requests 256 --input-len 100:1024 --output-len 100:1024 --seed 0 --ignore-eos"
python3 scripts/gpu_e2e.py > $OUT/e2e.log 2>&1; tail -8 $OUT/e2e.log
for p in qwen3-0.6b-h100 llama-3-8b-h100; do
  bash -c "$D bench profiles/$p.yaml $W" > $OUT/$p-work.log 2>&1; grep -E "output tok/s|roofline|Error|error" $OUT/$p-work.log | tail -3
  bash -c "$D bench profiles/$p.yaml --batch-1" > $OUT/$p-b1.log 2>&1; grep -E "decode|roofline|Error|error" $OUT/$p-b1.log | tail -3
done
start=$(date +%s%N); bash -c "$D up profiles/llama-3-8b-h100.yaml --port 8011" > $OUT/up.log 2>&1 &
for i in $(seq 1 240); do if curl -sf localhost:8011/health >/dev/null; then echo "8B up: serving after $(( ($(date +%s%N) - start) / 1000000 )) ms"; break; fi; sleep 0.25; done
kill %1; sleep 2; tail -5 $OUT/up.log
