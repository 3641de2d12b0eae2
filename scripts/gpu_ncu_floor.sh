#!/bin/bash
# Nsight Compute on the batch-1 int4 GEMV (quant/int4_mma.py) at int4_mma.FLOOR 0 (shipped) and 2
# (every block's weights the split's first: L1 hits, wrong sums), one eager launch of each Llama-3-8B
# linear named: what the kernel waits on when DRAM is out of the way (docs/PERF.md run 25). Full
# reports in $OUT/ncu_NAME_fFLOOR.txt; the stall reasons (cycles a warp waits per issued
# instruction), pipe use and L1 traffic to stdout. Usage: bash scripts/gpu_ncu_floor.sh [NAME ...]
. scripts/gpu_setup.sh
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for s in ${@:-gate_up down}; do
  for f in 0 2; do
    $NCU --clock-control none --cache-control all --section SpeedOfLight --section WarpStateStats \
      --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section SourceCounters \
      --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      -k regex:_int4_mma --launch-skip 2 --launch-count 1 \
      python3 -c "import sys, runpy; from pagedeploy.quant import int4_mma; int4_mma.FLOOR = $f
sys.argv = ['gpu_int4_gemm.py', 'once', '1', '$s']; runpy.run_path('scripts/gpu_int4_gemm.py', run_name='__main__')" \
      > $OUT/ncu_${s}_f$f.txt 2>&1
    echo "== $s FLOOR=$f"
    grep -E "^\s+(Duration|DRAM Throughput|Warp Cycles Per Issued Instruction|Issue Slots Busy)\b" \
      $OUT/ncu_${s}_f$f.txt
    grep -E "smsp__average_warps_issue_stalled" $OUT/ncu_${s}_f$f.txt | awk '$NF+0 > 0.1 {print $1, $NF}' \
      | sed 's/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//'
    grep -iE "pipe|wavefront|bank" $OUT/ncu_${s}_f$f.txt | grep -v "^\s*-" | head -8
  done
done
