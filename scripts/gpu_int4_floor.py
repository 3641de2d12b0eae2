"""Issue 6, batch 1: what bounds the tensor-core int4 GEMV (int4_mma.py)? docs/PERF.md run 25.

Default: timing floors (int4_mma.FLOOR; wrong sums, valid times). Every block's x, or its weights,
or both, read from the split's first block, so that after the first they hit L1: per Llama-3-8B
linear (norm in front of qkv and gate_up, silu * up after gate_up), µs a call in a CUDA graph with
PDL over weights past L2, and a layer's four linears (8 layers in one graph), twice interleaved.
`--sweep`: launch shapes with more warps an SM (sweep's docstring; `--wide`: 128-row tiles).
`--e2e-floor [--rounds=N]`: `deploy bench --batch-1` decode tok/s at FLOOR 2 against shipped
(e2e_floor's docstring), N interleaved rounds (1).
Run 25's other modes (x prefetched into L1, the weights past L1, a group's MMAs in 4 or 8 chains)
lost and are gone; they ran at commit dff976d.
Usage (device machine): python3 scripts/gpu_int4_floor.py [REPS] [--sweep [--wide] | --e2e-floor] [--shapes=...]
"""
from __future__ import annotations

import sys

import torch

import gpu_int4_b1 as B1
import gpu_int4_fold as F
from gpu_common import RunLog
from gpu_int4 import time_calls

from pagedeploy.quant import int4_gemv as G
from pagedeploy.quant import int4_mma

log = RunLog("int4_floor.log")
FLOORS = {"shipped": 0, "floor: x in L1": 1, "floor: weights in L1": 2, "floor: both": 3}   # int4_mma.FLOOR


def set_mode(name: str) -> None:
    int4_mma.FLOOR = FLOORS[name]


def kernel_table() -> None:
    """µs a call per linear and a layer's four linears (the min of two interleaved repeats) per FLOORS mode."""
    rows = {}
    for name, (n, k, norm, silu), ws, x, fus, _, _ in B1.linear_cases(B1.ONLY):
        cfg = G.default_config(n, k, 128, silu, x.device)
        for mode in FLOORS:
            set_mode(mode)
            rows[(name, mode)] = time_calls([lambda w=w: G.int4_gemv(x, w, silu_mul=silu, config=cfg, **fus)
                                             for w in ws])
        log(f"{name:8s} " + "  ".join(f"{mode} {rows[(name, mode)]:6.2f}" for mode in FLOORS))
        del ws
        torch.cuda.empty_cache()
    layers = F.make_layers()
    chain = {}
    for _ in range(2):   # twice, interleaved: drift between repeats shows
        for mode in FLOORS:
            set_mode(mode)
            chain.setdefault(mode, []).append(time_calls([lambda layer=layer: F.run_layer(layer) for layer in layers]))
    for mode, us in chain.items():
        log(f"layer (4 linears) {mode:18s} " + " ".join(f"{u:6.2f}" for u in us) + " us")
    set_mode("shipped")
    del layers
    torch.cuda.empty_cache()
    log("\nus a call       " + " ".join(f"{m:>16s}" for m in FLOORS))
    for name in B1.ONLY:
        log(f"{name:16s}" + " ".join(f"{rows[(name, m)]:16.2f}" for m in FLOORS))
    log(f"{'layer chain':16s}" + " ".join(f"{min(chain[m]):16.2f}" for m in FLOORS))


def registers(x, w, s_mul: bool, cfg, fus) -> int:
    """Registers a thread of the launch int4_gemv makes at `cfg`."""
    regs, launch = [], int4_mma.launch
    int4_mma.launch = lambda *a, **kw: regs.append(launch(*a, **kw).n_regs)
    try:
        G.int4_gemv(x, w, silu_mul=s_mul, config=cfg, **fus)
    finally:
        int4_mma.launch = launch
    return regs[0]


def shapes(rows: int, k: int, s_mul: bool, sms: int):
    """(cfg, programs of the grid) to sweep: tile shapes, blocks ahead, splits that divide the
    blocks up to 8 programs an SM."""
    blocks = k // 512
    for bn, warps in (((64, 4), (128, 4), (128, 8)) if "--wide" in sys.argv else ((64, 4), (32, 2))):
        tiles = rows // bn * (2 if s_mul else 1)
        for ahead in (1, 2):
            for split in (d for d in range(1, blocks // 2 + 1) if blocks % d == 0 and tiles * d <= 8 * sms):
                yield G.Int4GemvConfig(bn, split, warps, mma=True, ahead=ahead, **G.pack_in_kernel(blocks, split)), \
                    tiles * split


def sweep() -> None:
    """Launch shapes at more warps an SM: 64 x 4 warps or 32 x 2 (the same tile a thread, half the
    registers a program), or (--wide) 128 x 4 (two rows' tiles a thread share x's operands, as
    gate_up's two streams do) and 128 x 8, one or two blocks ahead, every split that divides the
    blocks up to 8 programs an SM; gate_up also as one plain 2N-row stream (no silu: what a
    row-interleaved gate_up with silu * up in its epilogue would cost). µs a call and registers."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, (n, k, norm, silu), ws, x, fus, _, _ in B1.linear_cases(B1.ONLY):
        for plain in ((False, True) if silu else (False,)):
            rows, s_mul = (2 * n, False) if plain else (n, silu)
            label = name + (" as 2N plain" if plain else "")
            best = (1e9, "")
            for cfg, programs in shapes(rows, k, s_mul, sms):
                regs = registers(x, ws[0], s_mul, cfg, fus)
                us = time_calls([lambda w=w: G.int4_gemv(x, w, silu_mul=s_mul, config=cfg, **fus) for w in ws])
                shape = f"bn{cfg.block_n} w{cfg.num_warps} ahead {cfg.ahead} split {cfg.split_k}"
                fit = min(65536 // (regs * 32 * cfg.num_warps), 32 // cfg.num_warps)
                log(f"{label:18s} {shape}: {us:6.2f} us  {regs} registers ({fit} programs an SM fit, "
                    f"the grid gives {programs / sms:.1f})")
                best = min(best, (us, shape))
            log(f"{label:18s} best {best[0]:6.2f} us ({best[1]})")
        del ws
        torch.cuda.empty_cache()


def e2e_floor(reps: int) -> None:
    """`deploy bench --batch-1` decode tok/s with every int4 GEMV at FLOOR 2 (its weights L1 hits:
    wrong tokens, a valid time) against shipped, int4 and int4 + quantize_lm_head, interleaved, a
    fresh engine each; bf16 for the ratio. What the GEMV could give if DRAM cost it nothing."""
    rows = []
    for rnd in range(int(next((a.split("=")[1] for a in sys.argv if a.startswith("--rounds=")), "1"))):
        for keys in (["quantization=int4"], ["quantization=int4", "quantize_lm_head=true"]):
            for mode in ("shipped", "floor: weights in L1"):
                set_mode(mode)
                speeds = B1.batch1_speeds(keys, reps)
                rows.append((("int4+head" if len(keys) > 1 else "int4") + (" floor" if "floor" in mode else ""),
                             speeds))
                log(f"{' '.join(keys)} {mode}: " + " ".join(f"{v:7.1f}" for v in speeds))
        set_mode("shipped")
        if rnd == 0:
            bf16 = ("bf16", B1.batch1_speeds(["quantization=none"], reps))
            log("bf16: " + " ".join(f"{v:7.1f}" for v in bf16[1]))
    B1.log_speeds(rows + [bf16], log)


def main() -> int:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 3
    if "--sweep" in sys.argv:
        sweep()
    elif "--e2e-floor" in sys.argv:
        e2e_floor(reps)
    else:
        kernel_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
