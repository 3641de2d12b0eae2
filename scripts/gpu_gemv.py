"""fused_linear (kernels/triton_gemv.py) on the H100: per-linear times against cuBLAS, a tile sweep at
M=1, decoder-layer chains (the linears, norms and activation of every layer; no attention) unfused
vs fused with and without PDL, and cuBLAS variants at the workload's M = 64-256.

Times are CUDA-graph replays over enough weight copies to overflow L2 (decode reads weights from
HBM), median of 5. Run on the device machine; log under $OUT/gemv.log.
Usage: python3 scripts/gpu_gemv.py [--quick | --aot]   (--quick: M=1 per-linear and chains only;
--aot: compile for sm_90a without a GPU, print registers and spills of the main variants)
"""
from __future__ import annotations

import collections
import re
import statistics
import sys

import torch
import torch.nn.functional as F

from gpu_common import RunLog, compile_for_h100, ptxas_usage

log = RunLog("gemv.log")
DT = torch.bfloat16
MODELS = {  # hidden, q+kv rows, o in, intermediate, layers
    "qwen3-0.6b": (1024, 4096, 2048, 3072, 28),
    "llama-3-8b": (4096, 6144, 4096, 14336, 32),
}


def graph_us(fn, reps: int, tries: int = 5) -> float:
    """Median µs per call of fn(i) for i < reps, all captured in one graph."""
    for i in range(reps):
        fn(i)   # compile and warm outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i)
    graph.replay()
    times = []
    for _ in range(tries):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    return max(2, min(64, (400 << 20) // nbytes + 1))


def per_linear(M: int) -> None:
    from pagedeploy.kernels import rms_norm, silu_and_mul
    from pagedeploy.kernels.triton_gemv import fused_linear
    log(f"\n## per linear, M={M}: µs per call (cuBLAS = F.linear; + the norm / silu kernels it replaces)")
    log(f"{'shape':24s} {'cuBLAS':>8s} {'+fused ops':>10s} {'ours':>8s} {'ours/all':>8s} {'GB/s ours':>9s}")
    for model, (h, qkv, o_in, inter, _) in MODELS.items():
        for name, n, k, norm, silu in (("qkv", qkv, h, True, False), ("o", h, o_in, False, False),
                                        ("gate_up", 2 * inter, h, True, True), ("down", h, inter, False, False)):
            nbytes = n * k * 2
            ws = [torch.randn(n, k, device="cuda", dtype=DT) * k ** -0.5 for _ in range(copies_for(nbytes))]
            x = torch.randn(M, k, device="cuda", dtype=DT)
            r = torch.randn(M, k, device="cuda", dtype=DT)
            g = torch.ones(k, device="cuda", dtype=DT)
            t_cublas = graph_us(lambda i: F.linear(x, ws[i % len(ws)]), len(ws) * 2)

            def unfused(i):
                a = rms_norm(x, g, 1e-6, r)[0] if norm else x
                y = F.linear(a, ws[i % len(ws)])
                return silu_and_mul(y) if silu else y
            t_all = graph_us(unfused, len(ws) * 2)
            kw = dict(norm_weight=g, eps=1e-6, residual=r) if norm else {}
            t_ours = graph_us(lambda i: fused_linear(x, ws[i % len(ws)], silu_mul=silu, **kw), len(ws) * 2)
            log(f"{model + ' ' + name:24s} {t_cublas:8.2f} {t_all:10.2f} {t_ours:8.2f} "
                f"{t_all / t_ours:7.2f}x {nbytes / t_ours / 1e3:9.0f}")
            del ws


SWEEP_SHAPES = {"qwen qkv": (4096, 1024, False), "qwen o": (1024, 2048, False), "qwen gate_up": (6144, 1024, True),
                "qwen down": (1024, 3072, False), "llama qkv": (6144, 4096, False), "llama o": (4096, 4096, False),
                "llama gate_up": (28672, 4096, True), "llama down": (4096, 14336, False)}


def sweep_m1(names, bns=(8, 16, 32), bks=(128, 256, 512), warps=(2, 4, 8), splits=(1, 2, 4, 8)) -> None:
    """Every tile shape of the lists at M=1, each in a graph of back-to-back calls (PDL as in a model)."""
    from pagedeploy.kernels.triton_gemv import GemvConfig, default_config, fused_linear
    log("\n## M=1 tile sweep: µs per call (default first)")
    for name in names:
        n, k, silu = SWEEP_SHAPES[name]
        ws = [torch.randn(n, k, device="cuda", dtype=DT) * k ** -0.5 for _ in range(copies_for(n * k * 2))]
        x = torch.randn(1, k, device="cuda", dtype=DT)
        out_n = n // 2 if silu else n
        base = default_config(1, out_n, k, silu, x.device)
        results = []
        for bn in bns:
            for bk in bks:
                for warp in warps:
                    for split in splits:
                        cfg = GemvConfig(bn, bk, split, warp)
                        if bn * bk * (2 if silu else 1) > 16384 * warp // 4 or bk * split > 2 * k:
                            continue
                        try:
                            t = graph_us(lambda i: fused_linear(x, ws[i % len(ws)], silu_mul=silu, config=cfg),
                                         len(ws) * 2, tries=3)
                        except Exception as e:   # e.g. out of registers / shared memory
                            log(f"   {cfg}: {type(e).__name__}")
                            continue
                        results.append((t, cfg))
        t_def = graph_us(lambda i: fused_linear(x, ws[i % len(ws)], silu_mul=silu, config=base), len(ws) * 2)
        results.sort(key=lambda r: r[0])
        best = ", ".join(f"{t:.2f} (bn {c.block_n} bk {c.block_k} w {c.num_warps} s {c.split_k})" for t, c in results[:3])
        log(f"{name:14s} default {t_def:6.2f} (bn {base.block_n} bk {base.block_k} s {base.split_k}); best: {best}")
        del ws


def layer_chain(model: str, M: int) -> None:
    """Every layer's norm -> qkv, o, norm -> gate_up -> silu, down (distinct weights per layer)."""
    from pagedeploy.kernels import rms_norm, silu_and_mul
    from pagedeploy.kernels.triton_gemv import GemvConfig, default_config, fused_linear
    h, qkv, o_in, inter, layers = MODELS[model]
    mk = lambda n, k: torch.randn(n, k, device="cuda", dtype=DT) * k ** -0.5
    W = [(mk(qkv, h), mk(h, o_in), mk(2 * inter, h), mk(h, inter)) for _ in range(layers)]
    g = torch.ones(h, device="cuda", dtype=DT)
    x0 = torch.randn(M, h, device="cuda", dtype=DT)
    attn = torch.randn(M, o_in, device="cuda", dtype=DT)   # stands in for attention's output

    def unfused(_):
        x, r = x0, None
        for wq, wo, wgu, wd in W:
            a, r = rms_norm(x, g, 1e-6, r)
            F.linear(a, wq)
            x = F.linear(attn, wo)
            a, r = rms_norm(x, g, 1e-6, r)
            x = F.linear(silu_and_mul(F.linear(a, wgu)), wd)

    def fused(pdl: bool):
        def cfg(n, k, silu):
            c = default_config(M, n, k, silu, x0.device)
            return GemvConfig(c.block_n, c.block_k, c.split_k, c.num_warps, pdl)
        cq, co, cgu, cd = cfg(qkv, h, False), cfg(h, o_in, False), cfg(inter, h, True), cfg(h, inter, False)

        def run(_):
            x, r = x0, None
            for wq, wo, wgu, wd in W:
                _, r = fused_linear(x, wq, norm_weight=g, eps=1e-6, residual=r, config=cq)
                x, _ = fused_linear(attn, wo, config=co)
                a, r = fused_linear(x, wgu, norm_weight=g, eps=1e-6, residual=r, silu_mul=True, config=cgu)
                x, _ = fused_linear(a, wd, config=cd)
        return run
    t_unfused = graph_us(unfused, 1)
    rows = [("unfused (cuBLAS + norm + silu)", t_unfused)]
    for pdl in (False, True):
        rows.append((f"fused, pdl={pdl}", graph_us(fused(pdl), 1)))
    wbytes = sum(w.numel() * 2 for ws in W for w in ws)
    log(f"\n## {model} layer chain, M={M}: {layers} layers, {wbytes / 1e6:.0f} MB of weights "
        f"({wbytes / 2.95e6:.0f} µs at 2.95 TB/s)")
    for name, t in rows:
        log(f"  {name:34s} {t:8.1f} µs  ({t_unfused / t:.2f}x)")
    del W


def cublas_variants() -> None:
    log("\n## cuBLAS at the workload's M (Llama-3-8B shapes): µs per call")
    log(f"{'shape':18s} {'M':>4s} {'F.linear':>9s} {'mm(W,xT)T':>10s} {'cublasLt':>9s}")
    for name, n, k in (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)):
        ws = [torch.randn(n, k, device="cuda", dtype=DT) for _ in range(copies_for(n * k * 2))]
        for M in (64, 128, 192, 256):
            x = torch.randn(M, k, device="cuda", dtype=DT)
            a = graph_us(lambda i: F.linear(x, ws[i % len(ws)]), len(ws) * 2)
            b = graph_us(lambda i: torch.mm(ws[i % len(ws)], x.t()).t(), len(ws) * 2)
            torch.backends.cuda.preferred_blas_library("cublaslt")
            c = graph_us(lambda i: F.linear(x, ws[i % len(ws)]), len(ws) * 2)
            torch.backends.cuda.preferred_blas_library("cublas")
            log(f"{name:18s} {M:4d} {a:9.2f} {b:10.2f} {c:9.2f}")
        del ws


def aot() -> None:
    from pagedeploy.kernels.triton_gemv import _gemv_kernel
    types = {n: "*bf16" for n in ("x_ptr", "r_ptr", "nw_ptr", "w_ptr", "b_ptr", "y_ptr", "r_out_ptr")}
    types |= {"ws_ptr": "*fp32", "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "eps": "fp32",
              "k_tiles": "i32", "split_k": "i32", "stride_xm": "i32", "stride_rm": "i32",
              "stride_ym": "i32", "stride_wn": "i32"}
    for rows, bn, bk, norm, silu in ((1, 16, 256, False, False), (1, 8, 256, True, True), (4, 16, 128, True, False)):
        consts = dict(ROWS=rows, BLOCK_N=bn, BLOCK_K=bk, NORM=norm, RESIDUAL=norm, SILU_MUL=silu, HAS_BIAS=False,
                      USE_SPLIT=True, PDL=True)
        k = compile_for_h100(_gemv_kernel, types, consts, ["x_ptr", "w_ptr", "y_ptr", "K", "stride_wn"], 4, 1)
        ptx = k.asm["ptx"]
        loads = collections.Counter(re.findall(r"ld\.global[.\w:]*", ptx))
        print(f"rows {rows} bn {bn} bk {bk} norm {norm} silu {silu}: {ptxas_usage(ptx)}; "
              f"griddepcontrol {ptx.count('griddepcontrol')}; loads {dict(loads)}")


def main(quick: bool) -> None:
    log(f"# gpu_gemv.py on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for M in (1,) if quick else (1, 4):
        per_linear(M)
    for model in MODELS:
        for M in (1,) if quick else (1, 2):
            layer_chain(model, M)
    if not quick:
        sweep_m1(list(SWEEP_SHAPES))
        cublas_variants()


if __name__ == "__main__":
    if "--aot" in sys.argv:
        aot()
    elif "--sweep-qwen" in sys.argv:   # larger K tiles for the small Qwen3-0.6B weights
        sweep_m1([n for n in SWEEP_SHAPES if n.startswith("qwen")], bns=(4, 8, 16), bks=(512, 1024, 2048),
                 warps=(4, 8), splits=(1, 2, 4))
    elif "--sweep-llama" in sys.argv:
        sweep_m1(["llama qkv", "llama o", "llama down"], bns=(4, 8), bks=(512, 1024, 2048), warps=(4, 8),
                 splits=(1, 2))
    else:
        main("--quick" in sys.argv)
