"""Issue 6, batch 1: does the int4 GEMV's time follow its bytes, or its busiest SM? One run.

Llama-3-8B's gate_up (silu, K 4096) and down (K 14336) with their shipped launch configs held
fixed, at row counts giving 132 to 264 programs (2 fit an SM, 132 SMs): if each program's loads in
flight bound it, microseconds grow with the tiles (GB/s flat); if the busiest SM sets the time,
they step where programs pass 132 and GB/s peaks at 264 (every SM two). Median µs a call, weights
overflowing L2, CUDA graph with PDL, as time_calls runs them (the premise of a stream-K split,
docs/PERF.md run 22).
Usage (device machine): python3 scripts/gpu_int4_balance.py
"""
from __future__ import annotations

import torch

from gpu_common import RunLog
from gpu_int4 import L2_BYTES, random_int4, time_calls

from pagedeploy.quant import int4_gemv as G

log = RunLog("int4_balance.log")
# name: (K, silu, tile counts, rows per tile and stream); the program count is tiles x split (x1 here)
CASES = {"gate_up": (4096, True, (132, 176, 200, 224, 248, 264)),
         "down": (14336, False, (33, 44, 56, 64, 66))}


def main() -> None:
    x = {k: torch.randn(1, k, device="cuda").to(torch.bfloat16) for k in (4096, 14336)}
    for name, (k, silu, tile_counts) in CASES.items():
        real_n = 14336 if silu else 4096
        cfg = G.default_config(real_n, k, 128, silu, x[k].device)   # the shipped launch, held fixed
        for tiles in tile_counts:
            n = 64 * tiles
            rows = 2 * n if silu else n
            nbytes = rows * k * 0.53125
            copies = max(2, int(2 * L2_BYTES // nbytes) + 1)
            ws = [random_int4(rows, k, seed=i) for i in range(copies)]
            us = time_calls([lambda w=w: G.int4_gemv(x[k], w, silu_mul=silu, config=cfg) for w in ws])
            log(f"{name:8s} tiles {tiles:4d} programs {tiles * cfg.split_k:4d} split {cfg.split_k} "
                f"ahead {cfg.ahead}: {us:7.2f} us  {nbytes / us / 1e3:6.0f} GB/s  {us / tiles:6.3f} us/tile")
            del ws
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
