"""Issue 6, batch 1: the rotary and the KV store in the int4 qkv GEMV's epilogue (RopeStore,
runtime/model.py's ROPE_IN_GEMV) against their own launch after it (qk_norm_rope_store).

Check: for Llama-3-8B's qkv (norm and residual in front, the shipped tensor-core launch, and a bias),
q and the new K/V cache rows of the fused launch against int4_gemv then qk_norm_rope_store, bit
for bit. Chain: gpu_decode_attention's attention half of a layer (qkv with its norm, rotary + store,
attention, o), 8 layers in one CUDA graph, µs a layer, separate and fused, at a few contexts.
Then `deploy bench --batch-1` decode tok/s of Llama-3-8B dims, int4 separate against fused,
interleaved, a fresh engine each, and bf16 (which never fuses).
`--after`: only attention's launch knobs (pre-wait, early launch) behind the fused GEMV.
Usage (device machine): python3 scripts/gpu_rope_gemv.py [REPS] [--kernels-only | --e2e-only | --after]
"""
from __future__ import annotations

import sys

import torch

import gpu_decode_attention as DA
import gpu_int4_b1 as B1
from gpu_common import RunLog
from gpu_int4 import time_calls

from pagedeploy.kernels import qk_norm_rope_store
from pagedeploy.kernels.triton_fused import RopeStore
from pagedeploy.quant import int4_gemv as G
from pagedeploy.runtime import model as M

log = RunLog("rope_gemv.log")
H, KH, D = DA.H, DA.KH, DA.D


def fused_qkv(layer: DA.Layer, bias=None) -> torch.Tensor:
    q = torch.empty(1, H, D, dtype=torch.bfloat16, device="cuda")
    rope = RopeStore(q, layer.pos, layer.cos_sin, layer.k_cache, layer.v_cache, layer.slot)
    return G.int4_gemv(layer.x, layer.wqkv, bias, norm_weight=layer.norm, eps=1e-6, residual=layer.res,
                       rope=rope)[0]


def separate_qkv(layer: DA.Layer, bias=None) -> torch.Tensor:
    qkv = G.int4_gemv(layer.x, layer.wqkv, bias, norm_weight=layer.norm, eps=1e-6, residual=layer.res)[0]
    return qk_norm_rope_store(qkv, None, None, 0.0, layer.pos, layer.cos_sin, layer.k_cache, layer.v_cache,
                              layer.slot, H, KH, D)


def new_rows(layer: DA.Layer) -> torch.Tensor:
    """The K and V rows of the layer's slot."""
    block, off = divmod(layer.slot.item(), DA.BS)
    return torch.stack((layer.k_cache[block, off], layer.v_cache[block, off])).clone()


def check(layer: DA.Layer) -> str:
    """Fused against separate on the same layer, without and with a bias: q and the cache rows."""
    out = []
    for bias in (None, torch.randn(6144, device="cuda").to(torch.bfloat16)):
        q_sep = separate_qkv(layer, bias)
        rows_sep = new_rows(layer)
        block, off = divmod(layer.slot.item(), DA.BS)
        for cache in (layer.k_cache, layer.v_cache):   # noise that the fused call must overwrite
            cache[block, off] = torch.randn_like(cache[block, off])
        q_fused = fused_qkv(layer, bias)
        rows_fused = new_rows(layer)
        same = torch.equal(q_fused, q_sep) and torch.equal(rows_fused, rows_sep)
        diff = max((q_fused.float() - q_sep.float()).abs().max().item(),
                   (rows_fused.float() - rows_sep.float()).abs().max().item())
        verdict = "bit-equal" if same else f"max |diff| {diff:.2e}"
        out.append(f"{'bias' if bias is not None else 'no bias'}: {verdict}")
    return ", ".join(out)


class FusedLayer(DA.Layer):
    def run(self, mode, skip: bool = False):
        q = fused_qkv(self)
        o = q if skip else self.attention(q, mode)
        return self.linear(o.reshape(1, H * D), self.wo)


def chain_table() -> None:
    mode = DA.MODES["default"]
    DA.set_mode(mode)
    rows = []
    for ctx in (128, 256, 1024, 4096):
        row = [ctx]
        for cls in (DA.Layer, FusedLayer):
            layers = [cls(i, ctx, True) for i in range(DA.LAYERS)]
            if cls is FusedLayer and ctx == 256:
                log(f"check, Llama-3-8B qkv: {check(layers[0])}")
            row.append(time_calls([lambda lay=lay: lay.run(None, skip=True) for lay in layers]))
            row.append(time_calls([lambda lay=lay: lay.run(mode) for lay in layers]))
            del layers
            torch.cuda.empty_cache()
        rows.append(row)
        log(f"ctx {ctx:5d}: separate {row[1]:6.2f} / {row[2]:6.2f}, fused {row[3]:6.2f} / {row[4]:6.2f} "
            "us a layer")
    log("\nint4 attention half of a layer, µs (8 layers, one graph): no attention / with attention")
    log("| ctx | separate, none | fused, none | separate | fused | saved |")
    log("|---|---|---|---|---|---|")
    for ctx, sn, sa, fn, fa in rows:
        log(f"| {ctx} | {sn:.2f} | {fn:.2f} | {sa:.2f} | {fa:.2f} | {sa - fa:.2f} |")


def attention_after() -> None:
    """--after: attention's launch knobs behind the fused GEMV, µs a layer."""
    from pagedeploy.kernels import triton_launch
    log("\nafter the fused qkv GEMV, µs a layer (attention half, 8 layers, one graph)")
    log("| ctx | default | no pre-wait | attention launches early too | separate, default |")
    log("|---|---|---|---|---|")
    for ctx in (256, 1024):
        fused = [FusedLayer(i, ctx, True) for i in range(DA.LAYERS)]
        row = []
        for name, early_attention in (("default", False), ("no pre-wait", False), ("default", True)):
            DA.set_mode(DA.MODES[name])
            triton_launch.EARLY_ATTENTION = early_attention
            row.append(time_calls([lambda lay=lay: lay.run(DA.MODES[name]) for lay in fused]))
        triton_launch.EARLY_ATTENTION = False
        DA.set_mode(DA.MODES["default"])
        del fused
        separate = [DA.Layer(i, ctx, True) for i in range(DA.LAYERS)]
        row.append(time_calls([lambda lay=lay: lay.run(DA.MODES["default"]) for lay in separate]))
        del separate
        torch.cuda.empty_cache()
        log(f"| {ctx} | " + " | ".join(f"{v:.2f}" for v in row) + " |")


def set_fused(on: bool) -> None:
    M.ROPE_IN_GEMV = on


def end_to_end(reps: int) -> None:
    modes = {"separate": lambda: set_fused(False), "fused": lambda: set_fused(True)}
    rows = B1.interleaved_ab(modes, reps, log)
    set_fused(True)
    B1.log_speeds(rows["int4"] + rows["none"][:1], log)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    reps = int(args[0]) if args else 2
    if "--after" in sys.argv:
        return attention_after()
    if "--e2e-only" not in sys.argv:
        chain_table()
    if "--kernels-only" not in sys.argv:
        end_to_end(reps)


if __name__ == "__main__":
    main()
