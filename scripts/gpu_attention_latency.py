"""Issue 6, batch 1: decode attention's latency on the critical path, end to end, in one run.

Two changes to kernels/triton_attention.py for split decode (few sequences), together: its programs
read the metadata and ask L2 for their first K/V tile before their PDL wait
(triton_launch.ATTENTION_PRE_WAIT), and the last split merges all of a tile's rows in one load
(triton_attention.MERGE_ROWS). `deploy bench --batch-1`
decode tok/s of Llama-3-8B dims, int4 and bf16, both off (run 21's kernel) and both on,
interleaved, a fresh engine each, REPS requests; the 64 greedy tokens of the bench prompt must be
compared across modes (the merge sums in another order, so a near-tie could flip one: reported,
not asserted).
Usage (device machine): python3 scripts/gpu_attention_latency.py [REPS]
"""
from __future__ import annotations

import sys

import gpu_int4_b1 as B1
from gpu_common import RunLog

from pagedeploy.kernels import triton_attention, triton_launch

log = RunLog("attention_latency.log")
MODES = {"off": False, "on": True}


def main() -> int:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    rows, first = {"int4": [], "none": []}, {}
    for quant in ("int4", "none", "int4"):
        for mode, on in MODES.items():
            triton_launch.ATTENTION_PRE_WAIT = triton_attention.MERGE_ROWS = on
            tokens: list[int] = []
            speeds = B1.batch1_speeds([f"quantization={quant}"], reps, tokens)
            first.setdefault((quant, mode), tokens)
            other = first.get((quant, "off"))
            log(f"{quant} {mode}: " + " ".join(f"{s:7.1f}" for s in speeds)
                + f"  tokens {'same' if tokens == first[(quant, mode)] else 'DIFFER'} as its first run, "
                + f"{'same' if tokens == other else 'other'} as off's")
            rows[quant].append((f"{quant} {mode}", speeds))
    triton_launch.ATTENTION_PRE_WAIT = triton_attention.MERGE_ROWS = True
    B1.log_speeds(rows["int4"] + rows["none"][:1], log)   # the ratio to bf16 with both off
    B1.log_speeds(rows["none"], log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
