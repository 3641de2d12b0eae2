"""Issue 6, batch 1: decode attention's latency on the critical path, end to end, in one run.

Two changes to kernels/triton_attention.py for split decode (few sequences), together: its programs
read the metadata and ask L2 for their first K/V tile before their PDL wait
(triton_launch.ATTENTION_PRE_WAIT), and the last split merges all of a tile's rows at once
(triton_attention.MERGE_ROWS; off: row by row). `deploy bench --batch-1` decode tok/s of Llama-3-8B
dims, int4 and bf16, both off and both on (run 22's other changes stay in both:
scripts/gpu_decode_attention.py times those),
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


def switch(on: bool) -> None:
    triton_launch.ATTENTION_PRE_WAIT = triton_attention.MERGE_ROWS = on


def main() -> int:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    rows = B1.interleaved_ab({mode: lambda on=on: switch(on) for mode, on in MODES.items()}, reps, log)
    switch(True)
    B1.log_speeds(rows["int4"] + rows["none"][:1], log)   # the ratio to bf16 with both off
    B1.log_speeds(rows["none"], log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
