"""Issue 6, batch 1: the tensor-core int4 GEMV as a stream-K launch (Int4GemvConfig.stream_k,
quant/int4_stream.py) against its (tiles, splits) grid, in one run.

1. Each Llama-3-8B decode linear (and an int4 lm_head) at its shipped launch and stream-K at 132
   and 264 programs with one or two units in flight: error against the fp32 product of the
   dequantized weights (both routes), median µs a call (CUDA graph with PDL, weights overflowing L2).
2. LAYERS copies of a layer's four linears as the model runs them (norm into qkv and gate_up, x packed
   in the GEMV), one CUDA graph, µs a layer: shipped, stream-K for gate_up only, for all four.
3. `deploy bench --batch-1` decode tok/s, int4 shipped against the fastest mode of 2 (if that is
   not shipped, or with --all), interleaved, a fresh engine each, and bf16
   (gpu_int4_b1.interleaved_ab); with --head, int4 with quantize_lm_head, its lm_head's launch
   shipped or stream-K (the rest shipped).
`--mode="stream all 2/SM"`: step 3 only, with that mode.
Usage (device machine): python3 scripts/gpu_int4_stream.py [REPS] [--kernels-only] [--head] [--mode=M]
"""
from __future__ import annotations

import dataclasses
import sys

import torch

import gpu_int4_b1 as B1
import gpu_int4_fold as F
from gpu_common import RunLog
from gpu_int4 import L2_BYTES, random_int4, time_calls

from pagedeploy.kernels.reference import fused_linear_ref
from pagedeploy.kernels.triton_launch import num_sms
from pagedeploy.quant import int4_gemv as G
from pagedeploy.quant.int4 import dequantize_int4

log = RunLog("int4_stream.log")
RULE = G.default_config
SHAPES = dict(B1.SHAPES, lm_head=(128256, 4096, False, False))


def stream_rule(programs: int, which: str, ahead: int | None = None):
    """default_config with its tensor-core launches made stream-K: "all", "gate_up" (silu) only,
    or "head" only (launches of more than 8 tiles an SM: an lm_head)."""
    def rule(N, K, group, silu_mul, device, mma=None):
        cfg = RULE(N, K, group, silu_mul, device, mma)
        picked = {"all": True, "gate_up": silu_mul, "head": N // cfg.block_n > 4 * programs}[which]
        if not cfg.mma or not picked:
            return cfg
        return dataclasses.replace(cfg, stream_k=programs, split_k=1, pack_words=512, ahead=ahead or cfg.ahead)
    return rule


def linear_table() -> None:
    sms = num_sms(torch.device("cuda"), 0)
    x = {k: torch.randn(1, k, device="cuda").to(torch.bfloat16) for k in (4096, 14336)}
    nw = (1 + 0.1 * torch.randn(4096, device="cuda")).to(torch.bfloat16)
    res = torch.randn(1, 4096, device="cuda").to(torch.bfloat16)
    for name, (n, k, norm, silu) in SHAPES.items():
        rows = 2 * n if silu else n
        shipped = RULE(n, k, 128, silu, x[k].device)
        variants = {"shipped": shipped}
        for programs in (sms, 2 * sms):
            for ahead in ((1,) if silu else (1, 2)):
                variants[f"stream {programs} a{ahead}"] = dataclasses.replace(
                    shipped, stream_k=programs, split_k=1, ahead=ahead, pack_words=512)
        fus = dict(norm_weight=nw, eps=1e-6, residual=res) if norm else {}
        copies = max(2, int(2 * L2_BYTES // (rows * k * 0.53125)) + 1)
        ws = [random_int4(rows, k, seed=i) for i in range(copies)]
        xin = x[k]
        f32 = {key: v.float() if isinstance(v, torch.Tensor) else v for key, v in fus.items()}
        exact = fused_linear_ref(xin.float(), dequantize_int4(ws[0]).float(), None, silu_mul=silu, **f32)[0]
        for label, cfg in variants.items():
            out = G.int4_gemv(xin, ws[0], silu_mul=silu, config=cfg, **fus)[0]
            again = G.int4_gemv(xin, ws[0], silu_mul=silu, config=cfg, **fus)[0]
            err = ((out.float() - exact).norm() / exact.norm()).item()
            us = time_calls([lambda w=w: G.int4_gemv(xin, w, silu_mul=silu, config=cfg, **fus) for w in ws])
            log(f"{name:8s} {label:16s} {us:7.2f} us  rel err {err:.2e}  "
                f"{'repeats' if torch.equal(out, again) else 'DIFFERS on repeat'}")
        del ws
        torch.cuda.empty_cache()


CHAIN_MODES = {"shipped": None, "stream gate_up 2/SM": (2, "gate_up"), "stream all 2/SM": (2, "all"),
               "stream all 1/SM": (1, "all")}
HEAD_MODE = (2, "head")


def set_chain_mode(mode, sms: int) -> None:
    G.default_config = RULE if mode is None else stream_rule(mode[0] * sms, mode[1])


def chain_table() -> str:
    """µs a layer per CHAIN_MODES; returns the fastest."""
    sms = num_sms(torch.device("cuda"), 0)
    layers = F.make_layers()
    table = {}
    for name, mode in CHAIN_MODES.items():
        set_chain_mode(mode, sms)
        F.run_layer(layers[0])
        table[name] = time_calls([lambda layer=layer: F.run_layer(layer) for layer in layers])
        log(f"layer {name:22s} {table[name]:7.2f} us")
    set_chain_mode(None, sms)
    del layers
    torch.cuda.empty_cache()
    return min(table, key=table.get)


def main() -> int:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 3
    chosen = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--mode=")]
    if chosen:   # end to end only, this CHAIN_MODES mode against shipped
        best = chosen[0]
    else:
        linear_table()
        best = chain_table()
    if "--kernels-only" in sys.argv:
        return 0
    sms = num_sms(torch.device("cuda"), 0)
    rows = {"int4": [], "none": []}
    if chosen or "--all" in sys.argv or best != "shipped":
        modes = {"shipped": lambda: set_chain_mode(None, sms),
                 best: lambda: set_chain_mode(CHAIN_MODES[best], sms)}
        rows = B1.interleaved_ab(modes, reps, log)
    if "--head" in sys.argv:   # int4 lm_head too, its launch shipped or stream-K (the rest shipped)
        for name, mode in (("shipped", None), ("stream head", HEAD_MODE), ("shipped", None)):
            set_chain_mode(mode, sms)
            rows["int4"].append((f"int4+head {name}",
                                 B1.batch1_speeds(["quantization=int4", "quantize_lm_head=true"], reps)))
            log(f"int4+head {name}: " + " ".join(f"{v:7.1f}" for v in rows["int4"][-1][1]))
        set_chain_mode(None, sms)
        if not rows["none"]:
            rows["none"].append(("bf16", B1.batch1_speeds(["quantization=none"], reps)))
    B1.log_speeds(rows["int4"] + rows["none"][:1], log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
