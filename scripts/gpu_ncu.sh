#!/bin/bash
# Nsight Compute on the shipped batch-1 int4 GEMV (quant/int4_mma.py), one eager launch of each
# Llama-3-8B linear named (default: gate_up down qkv; no CUDA graph, so no PDL overlap), run on the
# device machine from the repo root: the full reports go to $OUT/ncu_NAME.txt, a summary to stdout
# (docs/PERF.md run 23). Usage: bash scripts/gpu_ncu.sh [NAME ...]
. scripts/gpu_setup.sh
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for s in ${@:-gate_up down qkv}; do
  $NCU --clock-control none --cache-control all --section SpeedOfLight --section WarpStateStats \
    --section SchedulerStats --section Occupancy --section MemoryWorkloadAnalysis --section LaunchStats \
    --section SourceCounters --section InstructionStats -k regex:_int4_mma --launch-skip 2 --launch-count 1 \
    python3 scripts/gpu_int4_gemm.py once 1 $s > $OUT/ncu_$s.txt 2>&1
  echo "== $s"
  grep -E "^\s+(Duration|DRAM Throughput|Registers Per Thread|Achieved Occupancy|Active Warps Per Scheduler|Eligible Warps Per Scheduler|Warp Cycles Per Issued Instruction|Executed Instructions|Grid Size)\b" $OUT/ncu_$s.txt
  grep -E "stalled waiting|excessive sectors" $OUT/ncu_$s.txt
done
