"""Issue 6, batch 1: the int4 GEMV on int8 tensor cores (int4_mma.py's X8: x as two int8 limbs,
int4_pack._store_x8) against its fp16 MMAs, in one run. docs/PERF.md run 27.

1. Errors: per Llama-3-8B linear (bf16, norm and silu as the model runs them), ||y - exact|| /
   ||exact|| of the fp16 MMAs, of X8 and of the torch reference (bf16 weights), `exact` the fp32
   product of the dequantized weights.
2. Kernels: µs a call per linear and a layer's four linears (8 layers in one graph, twice
   interleaved), CUDA graph with PDL, weights past L2, per MODES entry.
3. `--e2e`: `deploy bench --batch-1` decode tok/s, int4 + quantize_lm_head and int4, per mode, a
   fresh engine each, REPS requests, with each mode's 64 greedy tokens against the fp16 MMAs'; bf16
   for the ratio.
Usage (device machine): python3 scripts/gpu_int4_x8.py [REPS] [--e2e] [--modes=a,b]
"""
from __future__ import annotations

import dataclasses
import sys

import torch

import gpu_int4_b1 as B1
import gpu_int4_fold as F
from gpu_common import RunLog
from gpu_int4 import rel, time_calls

from pagedeploy.kernels.reference import fused_linear_ref
from pagedeploy.quant import int4_gemv as G
from pagedeploy.quant import int4_mma
from pagedeploy.quant.int4 import dequantize_int4

log = RunLog("int4_x8.log")
RULE = G.default_config
# name: how each mma launch of the default rule changes (silu_mul: gate_up's two streams)
MODES = {   # name: Int4GemvConfig changes; names also set int4_mma's X8_FORM and FLOOR (set_mode)
    "fp16 MMA": dict(),
    "x8": dict(x8=True),
    "x8 broadcast": dict(x8=True),       # X8_FORM 3
    "fp16 floor 2": dict(),              # int4_mma.FLOOR 2: weights in L1 (wrong sums, valid times)
    "x8 broadcast floor 2": dict(x8=True),
}


def set_mode(name: str) -> None:
    change = MODES[name]
    int4_mma.X8_FORM = 3 if "broadcast" in name else 1
    int4_mma.FLOOR = 2 if "floor 2" in name else 0
    F.set_mode("floor" if "prepacked" in name else None)   # pack_x's result cached: not timed

    def rule(n, k, group, silu_mul, device, mma=None):
        cfg = RULE(n, k, group, silu_mul, device, mma)
        return dataclasses.replace(cfg, **change) if cfg.mma else cfg
    G.default_config = rule


def modes() -> list[str]:
    for arg in sys.argv:
        if arg.startswith("--modes="):
            return [m for m in MODES if any(m.startswith(a) for a in arg.split("=", 1)[1].split(","))]
    return list(MODES)


def errors() -> None:
    """Relative error against the fp32 product, per linear and mode, and the bf16 reference's."""
    for name, (n, k, norm, silu), ws, x, fus, nw, res in B1.linear_cases(B1.ONLY):
        w = ws[0]
        kw = dict(norm_weight=nw, eps=1e-6, residual=res) if norm else {}
        exact, _ = fused_linear_ref(x.float(), dequantize_int4(w).float(), None, silu_mul=silu,
                                    **{key: (v.float() if isinstance(v, torch.Tensor) else v) for key, v in kw.items()})
        ref, _ = fused_linear_ref(x, dequantize_int4(w).to(x.dtype), None, silu_mul=silu, **kw)
        row = {"bf16 reference": rel(ref, exact)}
        for mode in modes():
            set_mode(mode)
            row[mode] = rel(G.int4_gemv(x, w, silu_mul=silu, **fus)[0], exact)
        log(f"error {name:8s} " + "  ".join(f"{key} {v:.2e}" for key, v in row.items()))
        del ws
    G.default_config = RULE


def kernel_table() -> None:
    """µs a call per linear and per layer (the min of two interleaved repeats) per mode."""
    rows = {}
    for name, (n, k, norm, silu), ws, x, fus, _, _ in B1.linear_cases(B1.ONLY):
        for mode in modes():
            set_mode(mode)
            rows[(name, mode)] = time_calls([lambda w=w: G.int4_gemv(x, w, silu_mul=silu, **fus) for w in ws])
        log(f"{name:8s} " + "  ".join(f"{mode} {rows[(name, mode)]:6.2f}" for mode in modes()))
        del ws
        torch.cuda.empty_cache()
    layers = F.make_layers()
    chain: dict[str, list[float]] = {}
    for _ in range(2):
        for mode in modes():
            set_mode(mode)
            chain.setdefault(mode, []).append(time_calls([lambda layer=layer: F.run_layer(layer) for layer in layers]))
    set_mode("fp16 MMA")
    G.default_config = RULE
    del layers
    torch.cuda.empty_cache()
    log("\nus a call        " + " ".join(f"{m:>20s}" for m in modes()))
    for name in B1.ONLY:
        log(f"{name:16s} " + " ".join(f"{rows[(name, m)]:20.2f}" for m in modes()))
    log(f"{'layer (2 rounds)':16s} " + " ".join(f"{min(chain[m]):10.2f} {max(chain[m]):9.2f}" for m in modes()))


def end_to_end(reps: int) -> None:
    """Decode tok/s per mode, int4 + head then int4, and bf16; greedy tokens against the first mode's."""
    rows, first = [], {}
    for keys in (["quantization=int4", "quantize_lm_head=true"], ["quantization=int4"]):
        label = "int4+head" if len(keys) > 1 else "int4"
        for mode in modes():
            set_mode(mode)
            tokens: list[int] = []
            speeds = B1.batch1_speeds(keys, reps, tokens)
            first.setdefault(label, tokens)
            same = sum(a == b for a, b in zip(tokens, first[label]))
            log(f"{label} {mode}: " + " ".join(f"{s:7.1f}" for s in speeds) + f"  greedy tokens equal to the "
                f"first mode's: {same} of {len(tokens)}")
            rows.append((f"{label} {mode}", speeds))
    G.default_config = RULE
    bf16 = B1.batch1_speeds(["quantization=none"], reps)
    log("bf16: " + " ".join(f"{v:7.1f}" for v in bf16))
    B1.log_speeds(rows + [("bf16", bf16)], log)


def main() -> int:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 3
    if "--e2e" in sys.argv:
        end_to_end(reps)
        return 0
    errors()
    kernel_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
