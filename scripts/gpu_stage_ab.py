"""A decode step's graph inputs staged by one Triton launch (kernels.stage_decode_inputs) against
the five copies and two fills it replaces (its torch reference), batch-1 decode tok/s of the
Llama-3-8B profile, int4 + quantize_lm_head and bf16, a fresh engine each, modes interleaved, and
each mode's 64 greedy tokens against the other's. docs/PERF.md run 27.
Usage (device machine): python3 scripts/gpu_stage_ab.py [REPS] [ROUNDS]
"""
from __future__ import annotations

import sys

import gpu_int4_b1 as B1
from gpu_common import RunLog

from pagedeploy.kernels import stage_decode_inputs, stage_decode_inputs_ref
from pagedeploy.runtime import cuda_graphs

log = RunLog("stage_ab.log")
MODES = {"one launch": stage_decode_inputs, "copies (before)": stage_decode_inputs_ref}


def main() -> int:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    rows, tokens = [], {}
    for keys, label, n in ((["quantization=int4", "quantize_lm_head=true"], "int4+head", rounds),
                           (["quantization=none"], "bf16", 1)):
        for _ in range(n):
            for mode, fn in MODES.items():
                cuda_graphs.stage_decode_inputs = fn
                got: list[int] = []
                speeds = B1.batch1_speeds(keys, reps, got)
                tokens.setdefault(label, got)
                log(f"{label} {mode}: " + " ".join(f"{s:7.1f}" for s in speeds)
                    + f"  tokens {'same as' if got == tokens[label] else 'DIFFER from'} the first run's")
                rows.append((f"{label} {mode}", speeds))
    cuda_graphs.stage_decode_inputs = stage_decode_inputs
    B1.log_speeds(rows, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
