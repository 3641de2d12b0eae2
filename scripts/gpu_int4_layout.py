"""Issue 6, int4 batch 1: does the weight layout bound the GEMV? The same kernel (quant/int4_gemv.py)
reads the codes row-major ([out, in/8], a row's 256-byte block per step, 64 rows 2+ KB apart) or
blocked ([in/8 / R, out, R]: runs of R words, R = 16 (a group: a program's group tile is one
contiguous 4 KB) or 64 (a block of four groups, 16 KB)),
on Llama-3-8B's decode shapes, in one run: outputs must be equal bit for bit, then us per call.
Usage (device machine): python3 scripts/gpu_int4_layout.py [--ncu]
"""
from __future__ import annotations

import sys

import torch

from gpu_common import RunLog
from gpu_int4 import random_int4, time_calls
from gpu_int4_b1 import SHAPES, copies

from pagedeploy.quant import int4_gemv as G
from pagedeploy.quant.int4 import Int4Weight

log = RunLog("int4_layout.log")


def blocked(w: Int4Weight, run: int) -> Int4Weight:
    """The codes in [KW / run, N, run] order (stored in the same [N, KW] tensor shape)."""
    n, kw = w.packed.shape
    p = w.packed.view(n, kw // run, run).transpose(0, 1).contiguous().view(n, kw)
    return Int4Weight(p, w.scales, w.zeros, w.shape, w.group_size)


def main() -> None:
    bf = torch.bfloat16
    x = torch.randn(1, 14336, device="cuda").to(bf)
    res = torch.randn(1, 4096, device="cuda").to(bf)
    nw = (1 + 0.1 * torch.randn(4096, device="cuda")).to(bf)
    total = {"plain": 0.0, "run16": 0.0, "run64": 0.0}
    for name, (n, k, norm, silu) in SHAPES.items():
        rows = 2 * n if silu else n
        ws = [random_int4(rows, k, seed=i) for i in range(copies(rows * k // 2))]
        w16 = [blocked(w, 16) for w in ws]
        w64 = [blocked(w, 64) for w in ws]
        xk = x[:, :k]
        fus = dict(norm_weight=nw, eps=1e-6, residual=res, silu_mul=silu) if norm else dict(silu_mul=silu)
        cfgs = {"default": G.default_config(n, k, 128, silu, x.device)}
        for bn, nw_, split in ((32, 2, 1), (32, 2, 2), (32, 2, 4), (32, 2, 8), (64, 4, 2), (64, 4, 8), (128, 4, 1), (128, 8, 2)):
            cfgs[f"bn{bn} w{nw_} s{split}"] = G.Int4GemvConfig(bn, split, nw_)
        if "--ncu" in sys.argv:   # one launch of each layout, gate_up and down only (for ncu)
            if name in ("gate_up", "down"):
                G.int4_gemv(xk, ws[0], **fus)
                G.int4_gemv(xk, w16[0], blocked=16, **fus)
                G.int4_gemv(xk, w64[0], blocked=64, **fus)
                torch.cuda.synchronize()
            continue
        best = {}
        for cname, cfg in cfgs.items():
            a = G.int4_gemv(xk, ws[0], config=cfg, **fus)[0]
            same = all(torch.equal(a, G.int4_gemv(xk, wl[0], config=cfg, blocked=run, **fus)[0])
                       for run, wl in ((16, w16), (64, w64)))
            t = {lay: time_calls([lambda w=w: G.int4_gemv(xk, w, config=cfg, blocked=run, **fus) for w in wl])
                 for lay, run, wl in (("plain", 0, ws), ("run16", 16, w16), ("run64", 64, w64))}
            for lay, v in t.items():
                best.setdefault(lay, []).append(v)
            log(f"{name:8s} {cname:14s} " + "  ".join(f"{k} {v:7.2f}" for k, v in t.items()) + f"  equal={same}")
        gb = (rows * k // 2 + rows * k // 128 * 4) / 1e9
        for lay in total:
            t = min(best[lay])
            total[lay] += t
            log(f"{name:8s} best {lay:8s} {t:7.2f} us = {gb / t * 1e3:.2f} TB/s")
        del ws, w16, w64
        torch.cuda.empty_cache()
    log("layer: " + ", ".join(f"{k} {v:.2f} us" for k, v in total.items()))


if __name__ == "__main__":
    main()
