"""Issue 6, batch 1: decode attention on a layer's critical path, kernels and end to end, in one run.

Chain: LAYERS copies of a Llama-3-8B layer's attention half at batch 1 as the model runs it (qkv
linear with its norm, rotary + KV store, paged attention, o linear), int4 or bf16, in one CUDA
graph (PDL as in the model), median microseconds a layer, at several contexts. Attention modes:
none (o reads q: the floor); run 21's (every split of the grid sized for the graph's 8192-token
bound arrives, min_chunk 1, and 32 splits merge row by row); the shipped default (only the splits
a context needs, MIN_CHUNK tokens at least, merged all rows at once); each of those two changes
alone; MIN_CHUNK 128/256; the grid sized by the context itself; the pre-wait off; two pipeline
stages (the default before run 22's call 3), 32-token tiles, 2 warps. Each mode's attention
output is checked against the torch reference first.
Then `deploy bench --batch-1` decode tok/s of Llama-3-8B dims, int4 and bf16, run 21's attention
against the default, interleaved, a fresh engine each; 64 greedy tokens compared across modes.
Usage (device machine): python3 scripts/gpu_decode_attention.py [REPS] [--kernels-only | --e2e-only]
[--ab=MODE,MODE]   (the end-to-end modes, "run 21,default" by default; the first is the baseline)
"""
from __future__ import annotations

import os
import sys

import torch

import gpu_int4_b1 as B1
from gpu_common import RunLog
from gpu_int4 import random_int4, time_calls

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from kernel_checks import rel_err  # noqa: E402

from pagedeploy.kernels import fused_linear, qk_norm_rope_store  # noqa: E402
from pagedeploy.kernels import reference as ref  # noqa: E402
from pagedeploy.kernels import triton_attention as A  # noqa: E402
from pagedeploy.kernels import triton_launch  # noqa: E402
from pagedeploy.quant import int4_gemv as G  # noqa: E402

log = RunLog("decode_attention.log")
LAYERS, BOUND, BS = 8, 8192, 16
H, KH, D, HIDDEN = 32, 8, 128, 4096
CONTEXTS = (128, 256, 512, 1024, 2048, 4096)
# mode: (MIN_CHUNK, bound the grid is sized by (None: the context), pre-wait, merge all rows at
# once, launch_config overrides)
NEW = A.MIN_CHUNK
MODES = {
    "run 21": (1, BOUND, True, False, dict(num_stages=2)),
    "default": (NEW, BOUND, True, True, None),
    "all splits arrive": (1, BOUND, True, True, None),
    "merge by row": (NEW, BOUND, True, False, None),
    "min_chunk 128": (128, BOUND, True, True, None),
    "min_chunk 256": (256, BOUND, True, True, None),
    "grid by context": (NEW, None, True, True, None),
    "no pre-wait": (NEW, BOUND, False, True, None),
    "2 stages": (NEW, BOUND, True, True, dict(num_stages=2)),
    "block_n 32": (32, BOUND, True, True, dict(block_n=32)),
    "2 warps": (NEW, BOUND, True, True, dict(num_warps=2)),
}

CONFIG = A.launch_config


def set_mode(mode) -> None:
    """Switch the module's knobs to `mode`; its launch_config overrides apply to every launch
    (end to end the model passes none)."""
    A.MIN_CHUNK, _, triton_launch.ATTENTION_PRE_WAIT, A.MERGE_ROWS, tune = mode
    def config(decode, qg, extra=None, splits=1):
        return CONFIG(decode, qg, {**(tune or {}), **(extra or {})}, splits)
    A.launch_config = config


class Layer:
    """One layer's weights, its own KV cache, and a sequence of `ctx` tokens in random blocks."""

    def __init__(self, i: int, ctx: int, int4: bool):
        bf = torch.bfloat16
        g = torch.Generator(device="cuda").manual_seed(i)
        if int4:
            self.wqkv = random_int4(6144, HIDDEN, seed=2 * i)
            self.wo = random_int4(HIDDEN, HIDDEN, seed=2 * i + 1)
        else:
            self.wqkv = (torch.randn(6144, HIDDEN, device="cuda", generator=g) * 0.02).to(bf)
            self.wo = (torch.randn(HIDDEN, HIDDEN, device="cuda", generator=g) * 0.02).to(bf)
        self.int4 = int4
        blocks = BOUND // BS
        self.k_cache = torch.randn(blocks, BS, KH, D, device="cuda", generator=g).to(bf)
        self.v_cache = torch.randn(blocks, BS, KH, D, device="cuda", generator=g).to(bf)
        table = torch.randperm(blocks, device="cuda", generator=g).to(torch.int32)[None, :]
        self.table = table
        self.ctx = torch.tensor([ctx], dtype=torch.int32, device="cuda")
        self.qsl = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
        self.pos = torch.tensor([ctx - 1], device="cuda")
        self.slot = (table[0, (ctx - 1) // BS].long() * BS + (ctx - 1) % BS).reshape(1)
        self.norm = (1 + 0.1 * torch.randn(HIDDEN, device="cuda", generator=g)).to(bf)
        self.cos_sin = torch.randn(BOUND, D, device="cuda", generator=g)
        self.x = torch.randn(1, HIDDEN, device="cuda", generator=g).to(bf)
        self.res = torch.randn(1, HIDDEN, device="cuda", generator=g).to(bf)
        self.bound = ctx

    def linear(self, x, w, **fus):
        return G.int4_gemv(x, w, **fus)[0] if self.int4 else fused_linear(x, w, **fus)[0]

    def attention(self, q, mode):
        return A.paged_attention(q, self.k_cache, self.v_cache, self.table, self.ctx, self.qsl, D ** -0.5,
                                 num_decodes=1, max_context_len=mode[1] or self.bound, tune=mode[4])

    def run(self, mode, skip: bool = False):
        qkv = self.linear(self.x, self.wqkv, norm_weight=self.norm, eps=1e-6, residual=self.res)
        q = qk_norm_rope_store(qkv, None, None, 0.0, self.pos, self.cos_sin, self.k_cache, self.v_cache,
                               self.slot, H, KH, D, early_launch=not self.int4)
        o = q if skip else self.attention(q, mode)
        return self.linear(o.reshape(1, H * D), self.wo)


def check(layer: Layer, mode) -> float:
    q = torch.randn(1, H, D, device="cuda").to(torch.bfloat16)
    got = layer.attention(q, mode)
    up = lambda t: t.float()  # noqa: E731
    expect = ref.paged_attention_ref(up(q), up(layer.k_cache), up(layer.v_cache), layer.table, layer.ctx,
                                     layer.qsl, D ** -0.5)
    return rel_err(got, expect)


def chain_table() -> dict:
    table = {}
    for int4 in (True, False):
        kind = "int4" if int4 else "bf16"
        for ctx in CONTEXTS:
            layers = [Layer(i, ctx, int4) for i in range(LAYERS)]
            row = {"no attention": time_calls([lambda lay=lay: lay.run(None, skip=True) for lay in layers])}
            for name, mode in MODES.items():
                set_mode(mode)
                err = check(layers[0], mode)
                row[name] = time_calls([lambda lay=lay: lay.run(mode) for lay in layers])
                log(f"{kind} ctx {ctx:5d} {name:22s} {row[name]:7.2f} us/layer  attention err {err:.1e}")
            table[(kind, ctx)] = row
            del layers
            torch.cuda.empty_cache()
    set_mode(MODES["default"])
    log("\nus per layer (qkv, rotary + store, attention, o), CUDA graph of 8 layers; attention's share"
        " = mode - no attention")
    names = ["no attention", *MODES]
    log(f"{'':11s}" + "".join(f"{n[:14]:>15s}" for n in names))
    for (kind, ctx), row in table.items():
        log(f"{kind} {ctx:5d} " + "".join(f"{row[n]:15.2f}" for n in names))
    return table


def main() -> int:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 3
    ab = next((a.split("=", 1)[1].split(",") for a in sys.argv if a.startswith("--ab=")),
              ["run 21", "default"])
    if "--e2e-only" not in sys.argv:
        chain_table()
    if "--kernels-only" in sys.argv:
        return 0
    rows = B1.interleaved_ab({name: lambda name=name: set_mode(MODES[name]) for name in ab}, reps, log)
    set_mode(MODES["default"])
    B1.log_speeds(rows["int4"] + rows["none"][1:2], log)   # ratios to bf16 with the second mode
    B1.log_speeds(rows["none"], log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
