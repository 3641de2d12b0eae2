"""Issue 6, batch 1: x packed inside the tensor-core int4 GEMV (Int4GemvConfig.pack_in_kernel,
quant/int4_mma.py's PACK) against its own pack_x launch, in one run.

Kernels: LAYERS copies of a Llama-3-8B decoder layer's four int4 linears as the model runs them
(norm into qkv and gate_up, silu * up after gate_up), in one CUDA graph; median microseconds a
layer for: pack_x launched before each GEMV (run 20's shipped route), x packed by the GEMV's
programs (the default, which sizes the chunks per linear, and fixed chunk and norm load widths),
and, as a floor, the GEMVs alone on x packed once beforehand (what removing pack_x could at most
give); whether each row's outputs equal pack_x's bit for bit (they may not: the in-kernel pack can
sum a group's x in another order). Then `deploy bench --batch-1` decode tok/s of Llama-3-8B dims,
int4, pack_x against the default, interleaved, a fresh engine each (greedy tokens must repeat per
mode), and bf16 once for the ratio.
Usage (device machine): python3 scripts/gpu_int4_fold.py [REPS] [--kernels-only]
"""
from __future__ import annotations

import dataclasses
import sys

import torch

import gpu_int4_b1 as B1
from gpu_common import RunLog
from gpu_int4 import random_int4, time_calls

from pagedeploy.quant import int4_gemv as G

log = RunLog("int4_fold.log")
LAYERS = 8   # 8 x 116 MB of weights: far past the 50 MB L2
RULE, PACK_X = G.default_config, G.pack_x
MODES = {"pack_x launch": dict(pack_in_kernel=False), "default (in kernel)": None, "prepacked (floor)": "floor"}
for words, rstd in ((64, 4096), (128, 4096), (256, 4096), (512, 1024), (512, 2048), (512, 4096)):
    MODES[f"in kernel w{words} r{rstd}"] = dict(pack_in_kernel=True, pack_words=words, rstd_block=rstd)


def set_mode(mode) -> None:
    """Route int4_gemv's default launches through `mode` (a MODES value)."""
    G.default_config, G.pack_x = RULE, PACK_X
    if mode == "floor":
        cache: dict = {}

        def packed_once(x, *args, **kw):
            key = (id(x), *map(id, args), tuple(kw))
            if key not in cache:
                cache[key] = PACK_X(x, *args, **kw)
            return cache[key]
        G.pack_x = packed_once
    elif mode:
        def rule(*args, **kw):   # the default launch, packing as `mode` says
            cfg = RULE(*args, **kw)
            return dataclasses.replace(cfg, **mode) if cfg.mma else cfg
        G.default_config = rule


def make_layers():
    """LAYERS lists of (weight, x, fusions) for qkv, o, gate_up, down; random weights, x, norms."""
    bf = torch.bfloat16
    res = torch.randn(1, 4096, device="cuda").to(bf)
    nw = (1 + 0.1 * torch.randn(4096, device="cuda")).to(bf)
    xs = {k: torch.randn(1, k, device="cuda").to(bf) for k in (4096, 14336)}
    layers = []
    for i in range(LAYERS):
        layer = []
        for j, (lname, (n, k, norm, silu)) in enumerate(B1.SHAPES.items()):
            fus = dict(norm_weight=nw, eps=1e-6, residual=res) if norm else {}
            layer.append((random_int4(2 * n if silu else n, k, seed=4 * i + j), xs[k], dict(fus, silu_mul=silu)))
        layers.append(layer)
    return layers


def run_layer(layer) -> list[torch.Tensor]:
    outs = []
    for w, x, fus in layer:
        y, r_out = G.int4_gemv(x, w, **fus)
        outs += [y] + ([r_out] if r_out is not None else [])
    return outs


def kernel_table() -> dict[str, float]:
    layers = make_layers()
    set_mode(MODES["pack_x launch"])
    expect = [o.clone() for o in run_layer(layers[0])]
    table = {}
    for name, mode in MODES.items():
        set_mode(mode)
        same = all(torch.equal(a, b) for a, b in zip(run_layer(layers[0]), expect))
        table[name] = time_calls([lambda layer=layer: run_layer(layer) for layer in layers])
        log(f"layer {name:22s} {table[name]:7.2f} us  outputs {'equal' if same else 'DIFFER'}")
    set_mode(None)
    del layers
    torch.cuda.empty_cache()
    return table


def main() -> int:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 3
    table = kernel_table()
    if "--kernels-only" in sys.argv:
        return 0
    rows, first = [], {}
    for name in ["pack_x launch", "default (in kernel)"] * 2:   # interleaved: drift shows
        set_mode(MODES[name])
        tokens: list[int] = []
        speeds = B1.batch1_speeds(["quantization=int4"], reps, tokens)
        # greedy tokens: each mode against its own first run (launch order must not change them)
        # and against pack_x's (the in-kernel pack may sum a group's x in another order)
        first.setdefault(name, tokens)
        log(f"int4 {name}: " + " ".join(f"{s:7.1f}" for s in speeds)
            + f"  greedy tokens: {'same' if tokens == first[name] else 'DIFFER'} as its first run, "
            + f"{'same' if tokens == first['pack_x launch'] else 'other'} as pack_x's")
        rows.append((f"int4 {name}", speeds))
    set_mode(None)
    rows.append(("bf16", B1.batch1_speeds(["quantization=none"], reps)))
    B1.log_speeds(rows, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
