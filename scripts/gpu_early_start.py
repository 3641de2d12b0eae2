"""Issue 6, batch 1: early launch in the kernels that do nothing before their wait (rotary + KV
store, attention: kernels/triton_launch.EARLY_AT_START), off and on, for int4 and bf16 Llama-3-8B
dims, `deploy bench --batch-1` decode tok/s, REPS requests a fresh engine each, in one run; the
greedy tokens must not depend on when kernels launch.
Usage (device machine): python3 scripts/gpu_early_start.py [REPS]
"""
from __future__ import annotations

import sys

import gpu_int4_b1 as B1
from gpu_common import RunLog

from pagedeploy.kernels import triton_launch

log = RunLog("early_start.log")


def main(reps: int) -> None:
    rows, first_tokens = [], {}
    for early in (False, True, False, True):   # twice each, interleaved: drift shows
        for name, keys in (("int4", ["quantization=int4"]), ("bf16", ["quantization=none"])):
            triton_launch.EARLY_AT_START = early
            tokens: list[int] = []
            speeds = B1.batch1_speeds(keys, reps, tokens)
            same = first_tokens.setdefault(name, tokens) == tokens
            log(f"{name} early={early}: greedy tokens {'equal' if same else 'DIFFER'} (64, first run's)")
            rows.append((f"{name} early={early}", speeds))
            log(f"{name} early={early}: " + " ".join(f"{s:7.1f}" for s in speeds))
    triton_launch.EARLY_AT_START = False
    B1.log_speeds(rows, log)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
