"""Issue 6, P3 at batch 1: is the int4 GEMV bound by how its weights are loaded? (docs/PERF.md, run 16)

1. `--read`: read bandwidth alone. A kernel reads an int4 weight's words in the GEMV's tiles and only
   XORs them, loaded three ways: registers with the next block in flight (the shipped GEMV's way),
   Triton's software pipeline (cp.async into shared memory, STAGES deep) and TMA (a host tensor
   descriptor, STAGES deep).
2. The GEMV with the shipped kernel's math, per Llama-3-8B linear, against the shipped kernel:
   `v2` (each block's scales and zeros loaded with its weights, a block ahead; splits that fill
   whole waves; STAGGER: gate_up's next up block asked for after the gate block is summed), `v2
   shift-free` (one shift a word to decode the codes, not three) and, with `--pipe`, its loads left
   to Triton's pipeliner (cp.async or TMA).
All in a CUDA graph over weight copies that overflow L2, µs per call.
Usage (device machine): python3 scripts/gpu_int4_pipe.py [--read] [--pipe] [--shapes=gate_up,down]
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from gpu_common import RunLog
from gpu_int4 import time_calls
from gpu_int4_b1 import SHAPES, copies, linear_cases, shapes_wanted

from pagedeploy.kernels.triton_launch import arrival_counters, pdl_launch, wait_previous
from pagedeploy.quant import int4_gemv as G
from pagedeploy.quant.int4_mma import _scales

log = RunLog("int4_pipe.log")


# ---- 1. reading alone ---------------------------------------------------------------------------

@triton.jit
def _read_regs(w_ptr, out_ptr, KW, words_per_split, BLOCK_N: tl.constexpr, BW: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ptr = w_ptr + rows.to(tl.int64)[:, None] * KW + tl.arange(0, BW)[None, :]
    c0 = pid_k * words_per_split
    cur = tl.load(ptr + c0)
    acc = tl.zeros([BLOCK_N, BW], tl.int32)
    for t in range(c0 + BW, c0 + words_per_split, BW):
        nxt = tl.load(ptr + t)
        acc ^= cur
        cur = nxt
    acc ^= cur
    tl.atomic_xor(out_ptr + rows, tl.xor_sum(acc, 1))


@triton.jit
def _read_pipe(w_ptr, desc, out_ptr, KW, words_per_split, BLOCK_N: tl.constexpr, BW: tl.constexpr,
               STAGES: tl.constexpr, TMA: tl.constexpr):
    """The same reads in a loop Triton pipelines STAGES deep: cp.async, or TMA through `desc`."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ptr = w_ptr + rows.to(tl.int64)[:, None] * KW + tl.arange(0, BW)[None, :]
    c0 = pid_k * words_per_split
    acc = tl.zeros([BLOCK_N, BW], tl.int32)
    for t in tl.range(c0, c0 + words_per_split, BW, num_stages=STAGES):
        if TMA:
            acc ^= desc.load([pid_n * BLOCK_N, t])
        else:
            acc ^= tl.load(ptr + t)
    tl.atomic_xor(out_ptr + rows, tl.xor_sum(acc, 1))


def read_table() -> None:
    out = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
    for name, (n, k, _, silu) in SHAPES.items():
        if name not in ONLY:
            continue
        rows, kw = (2 * n if silu else n), k // 8
        ws = [torch.randint(-2 ** 31, 2 ** 31 - 1, (rows, kw), dtype=torch.int32, device="cuda")
              for _ in range(copies(rows * kw * 4))]
        nbytes = rows * kw * 4
        res = {}
        for bn, bw in ((64, 64), (64, 16), (128, 64)):
            for split in (1, 2, 4, 8):
                if kw % (split * bw) or (rows // bn) * split < 132:
                    continue
                wps, grid = kw // split, (rows // bn, split)
                tag = f"bn{bn} bw{bw} s{split}"
                res[f"regs {tag}"] = time_calls([lambda w=w: _read_regs[grid](w, out, kw, wps, bn, bw)
                                                for w in ws])
                descs = [TensorDescriptor.from_tensor(w, [bn, bw]) for w in ws]
                for st in (2, 3, 4, 6):
                    for tma in (False, True):
                        res[f"{'tma' if tma else 'pipe'}{st} {tag}"] = time_calls(
                            [lambda w=w, d=d: _read_pipe[grid](w, d, out, kw, wps, bn, bw, st, tma)
                             for w, d in zip(ws, descs)])
        for kind in ("regs", "pipe", "tma"):
            best = min((key for key in res if key.startswith(kind)), key=res.get)
            log(f"read {name:8s} {kind:5s} best {res[best]:6.2f} us = {nbytes / res[best] / 1e3:6.0f} GB/s"
                f"  ({best})")
        log(f"read {name:8s} all: " + " ".join(f"{key}={v:.2f}" for key, v in res.items()))
        del ws
        torch.cuda.empty_cache()


# ---- 2. the GEMV: loads pipelined by Triton (cp.async or TMA), or the shipped prefetch reordered ----

@triton.jit
def _tiles(row, desc, r0, t, c_end, mask_n, col, GW: tl.constexpr, TMA: tl.constexpr,
           EVEN: tl.constexpr):
    if TMA:
        return (desc.load([r0, t]), desc.load([r0, t + GW]), desc.load([r0, t + 2 * GW]),
                desc.load([r0, t + 3 * GW]))
    return G._load_block(row, t, c_end, mask_n, col, GW, EVEN)


@triton.jit(do_not_specialize=["split_k"])
def _gemv_pipe(xp_ptr, xw_ptr, w_ptr, desc, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
               N, KW, groups, words_per_split, split_k,
               GROUP: tl.constexpr, BLOCK_N: tl.constexpr, SILU_MUL: tl.constexpr,
               HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr, SPLITS: tl.constexpr,
               EVEN: tl.constexpr, PDL: tl.constexpr, TMA: tl.constexpr, STAGES: tl.constexpr):
    """_int4_gemv_kernel's math; the loads left to Triton's pipeliner (cp.async or TMA)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    GW: tl.constexpr = GROUP // 8
    offs_n, mask_n, col, c_start, c_end, row_g, row_u, s_g, z_g, s_u, z_u = G._program_rows(
        w_ptr, s_ptr, z_ptr, N, KW, groups, words_per_split, BLOCK_N, GW, EVEN)
    wait_previous(PDL)
    acc_g = tl.zeros([BLOCK_N, GW], tl.float32)
    acc_u = acc_g
    for t in tl.range(c_start, c_end, 4 * GW, num_stages=STAGES):
        g0, g1, g2, g3 = _tiles(row_g, desc, pid_n * BLOCK_N, t, c_end, mask_n, col, GW, TMA, EVEN)
        acc_g = G._block(g0, g1, g2, g3, t, s_g, z_g, offs_n, mask_n, c_end, xp_ptr, xw_ptr, KW,
                         acc_g, GW, True, EVEN)
        if SILU_MUL:
            u0, u1, u2, u3 = _tiles(row_u, desc, N + pid_n * BLOCK_N, t, c_end, mask_n, col, GW,
                                    TMA, EVEN)
            acc_u = G._block(u0, u1, u2, u3, t, s_u, z_u, offs_n, mask_n, c_end, xp_ptr, xw_ptr, KW,
                             acc_u, GW, True, EVEN)
    G._store_rows(acc_g, acc_u, offs_n, mask_n, N, b_ptr, y_ptr, ws_ptr, lock_ptr, pid_n, pid_k, split_k,
                  SILU_MUL, HAS_BIAS, USE_SPLIT, SPLITS)


@triton.jit
def _group_sz(words, t, s, z, xp_ptr, xw_ptr, KW, h, acc, GW: tl.constexpr, SHIFT_FREE: tl.constexpr):
    """G._group with the row's scale and zero already loaded."""
    c = t + tl.arange(0, GW)
    p0, p1, p2, p3, xw = G._x_pairs(xp_ptr, xw_ptr, c, c >= 0, KW)
    s = s.to(tl.float32)[:, None]
    acc += z.to(tl.float32)[:, None] * xw[None, :]
    h = G._codes_times_x(words, G._half2(s), G._half2(s * -1024.0), p0[None, :], p1[None, :],
                         p2[None, :], p3[None, :], h, SHIFT_FREE)
    return h, acc


@triton.jit
def _block_sz(w0, w1, w2, w3, t, sz, xp_ptr, xw_ptr, KW, acc, GW: tl.constexpr, SHIFT_FREE: tl.constexpr):
    s0, s1, s2, s3, z0, z1, z2, z3 = sz
    h = tl.zeros(w0.shape, tl.int32)
    h, acc = _group_sz(w0, t, s0, z0, xp_ptr, xw_ptr, KW, h, acc, GW, SHIFT_FREE)
    h, acc = _group_sz(w1, t + GW, s1, z1, xp_ptr, xw_ptr, KW, h, acc, GW, SHIFT_FREE)
    h, acc = _group_sz(w2, t + 2 * GW, s2, z2, xp_ptr, xw_ptr, KW, h, acc, GW, SHIFT_FREE)
    h, acc = _group_sz(w3, t + 3 * GW, s3, z3, xp_ptr, xw_ptr, KW, h, acc, GW, SHIFT_FREE)
    return G._flush(h, acc)


@triton.jit(do_not_specialize=["split_k"])
def _gemv_v2(xp_ptr, xw_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, lock_ptr,
             N, KW, groups, words_per_split, split_k,
             GROUP: tl.constexpr, BLOCK_N: tl.constexpr, SILU_MUL: tl.constexpr,
             HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr, SPLITS: tl.constexpr,
             PDL: tl.constexpr, STAGGER: tl.constexpr, SHIFT_FREE: tl.constexpr):
    """The shipped kernel (whole tiles, every split whole blocks and non-empty), with each block's
    scales and zeros loaded with its weights, a block ahead; STAGGER: gate_up asks for the next up
    block only after the gate block is summed (32 fewer live registers a thread); SHIFT_FREE: one
    shift a word (int4_gemv._codes_times_x's SHIFT_FREE, x pairs from pack_x(odd_over_16=True))."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    GW: tl.constexpr = GROUP // 8
    offs_n, mask_n, col, c_start, c_end, row_g, row_u, s_g, z_g, s_u, z_u = G._program_rows(
        w_ptr, s_ptr, z_ptr, N, KW, groups, words_per_split, BLOCK_N, GW, True)
    g0, g1, g2, g3 = G._load_block(row_g, c_start, c_end, mask_n, col, GW, True)
    sg = _scales(s_g, z_g, c_start, GW)
    u0, u1, u2, u3 = g0, g1, g2, g3
    su = sg
    if SILU_MUL:
        u0, u1, u2, u3 = G._load_block(row_u, c_start, c_end, mask_n, col, GW, True)
        su = _scales(s_u, z_u, c_start, GW)
    wait_previous(PDL)
    acc_g = tl.zeros([BLOCK_N, GW], tl.float32)
    acc_u = acc_g
    for t in range(c_start, c_end, 4 * GW):
        t_next = tl.minimum(t + 4 * GW, c_end - 4 * GW)
        n0, n1, n2, n3 = G._load_block(row_g, t_next, c_end, mask_n, col, GW, True)
        sn = _scales(s_g, z_g, t_next, GW)
        if SILU_MUL and not STAGGER:
            m0, m1, m2, m3 = G._load_block(row_u, t_next, c_end, mask_n, col, GW, True)
            sm = _scales(s_u, z_u, t_next, GW)
        acc_g = _block_sz(g0, g1, g2, g3, t, sg, xp_ptr, xw_ptr, KW, acc_g, GW, SHIFT_FREE)
        g0, g1, g2, g3 = n0, n1, n2, n3
        sg = sn
        if SILU_MUL:
            if STAGGER:
                m0, m1, m2, m3 = G._load_block(row_u, t_next, c_end, mask_n, col, GW, True)
                sm = _scales(s_u, z_u, t_next, GW)
            acc_u = _block_sz(u0, u1, u2, u3, t, su, xp_ptr, xw_ptr, KW, acc_u, GW, SHIFT_FREE)
            u0, u1, u2, u3 = m0, m1, m2, m3
            su = sm
    G._store_rows(acc_g, acc_u, offs_n, mask_n, N, b_ptr, y_ptr, ws_ptr, lock_ptr, pid_n, pid_k, split_k,
                  SILU_MUL, HAS_BIAS, USE_SPLIT, SPLITS)


def _split_words(K: int, group: int, split_k: int) -> tuple[int, int]:
    """(words a split, splits that hold any): whole blocks of four groups, empty splits dropped."""
    step = group // 8 * 4
    wps = triton.cdiv(triton.cdiv(K // 8, step), split_k) * step
    return wps, triton.cdiv(K // 8, wps)


def _launch_common(x, w, silu_mul, block_n, split_k, norm_weight, eps, residual, odd_over_16=False):
    N2, K = w.shape
    N = N2 // 2 if silu_mul else N2
    xp, xw, _ = G.pack_x(x, norm_weight, eps, residual, odd_over_16)
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    wps, split_k = _split_words(K, w.group_size, split_k)
    grid = (triton.cdiv(N, block_n), split_k)
    counters, ws = arrival_counters(x.device, grid[0] if split_k > 1 else 0), y
    if split_k > 1:
        ws = torch.empty(split_k * N2, dtype=torch.float32, device=x.device)
    return N, K, xp, xw, y, wps, split_k, grid, counters, ws


def gemv_pipe(x, w, desc, *, silu_mul, block_n, split_k, warps, tma, stages, norm_weight=None,
              eps=0.0, residual=None):
    N, K, xp, xw, y, wps, split_k, grid, counters, ws = _launch_common(
        x, w, silu_mul, block_n, split_k, norm_weight, eps, residual)
    _gemv_pipe[grid](xp, xw, w.packed, desc, w.scales, w.zeros, x, y, ws, counters, N, K // 8,
                     K // w.group_size, wps, split_k, GROUP=w.group_size, BLOCK_N=block_n,
                     SILU_MUL=silu_mul, HAS_BIAS=False, USE_SPLIT=split_k > 1,
                     SPLITS=triton.next_power_of_2(split_k),
                     EVEN=N % block_n == 0, PDL=2, TMA=tma, STAGES=stages,
                     num_warps=warps, **pdl_launch(x.device))
    return y


def gemv_v2(x, w, *, silu_mul, block_n, split_k, warps, stagger, shift_free=False, norm_weight=None,
            eps=0.0, residual=None):
    N, K, xp, xw, y, wps, split_k, grid, counters, ws = _launch_common(
        x, w, silu_mul, block_n, split_k, norm_weight, eps, residual, odd_over_16=shift_free)
    assert N % block_n == 0 and (K // 8) % (w.group_size // 2) == 0
    _gemv_v2[grid](xp, xw, w.packed, w.scales, w.zeros, x, y, ws, counters, N, K // 8,
                   K // w.group_size, wps, split_k, GROUP=w.group_size, BLOCK_N=block_n,
                   SILU_MUL=silu_mul, HAS_BIAS=False, USE_SPLIT=split_k > 1,
                   SPLITS=triton.next_power_of_2(split_k), PDL=2, STAGGER=stagger,
                   SHIFT_FREE=shift_free, num_warps=warps, **pdl_launch(x.device))
    return y


# launch shapes to try per linear: (rows a program, warps, K splits); 3 programs an SM fit at
# 137 registers (2 at gate_up's 255): splits that fill whole waves of those
V2_SHAPES = {
    "qkv": [(64, 4, 4), (64, 4, 3), (32, 4, 3), (32, 2, 3), (64, 4, 2)],
    "o": [(64, 4, 4), (64, 4, 6), (32, 4, 3), (32, 2, 3), (32, 4, 4)],
    "gate_up": [(64, 4, 1), (32, 2, 1)],
    "down": [(64, 4, 8), (64, 4, 7), (64, 4, 6), (32, 4, 3), (32, 2, 3), (32, 4, 4), (64, 4, 4)],
}


def gemv_table() -> dict:
    table = {}
    for name, (n, k, norm, silu), ws, xk, fus, _, _ in linear_cases(ONLY):
        ref = G.int4_gemv(xk, ws[0], silu_mul=silu, **fus)[0].float()
        row = {"shipped": time_calls([lambda w=w: G.int4_gemv(xk, w, silu_mul=silu, **fus) for w in ws])}
        jobs = []
        for bn, warps, split in V2_SHAPES[name]:
            for stagger in ((False, True) if silu else (False,)):
                jobs.append((f"v2{' stagger' if stagger else ''} bn{bn} w{warps} s{split}", gemv_v2,
                             dict(block_n=bn, warps=warps, split_k=split, stagger=stagger), None))
            jobs.append((f"v2 shift-free bn{bn} w{warps} s{split}", gemv_v2,
                         dict(block_n=bn, warps=warps, split_k=split, stagger=False, shift_free=True), None))
        if PIPE:
            for bn, warps, split in V2_SHAPES[name][:2]:
                descs = [TensorDescriptor.from_tensor(w.packed, [bn, 16]) for w in ws]
                for tma in (False, True):
                    for stages in (2, 3):
                        jobs.append((f"{'tma' if tma else 'pipe'}{stages} bn{bn} w{warps} s{split}",
                                     gemv_pipe, dict(block_n=bn, warps=warps, split_k=split, tma=tma,
                                                     stages=stages), descs))
        for tag, fn, kw, descs in jobs:
            kw = dict(kw, silu_mul=silu, **fus)
            extra = (lambda i: (descs[i],)) if descs else (lambda i: ())
            try:
                y = fn(xk, ws[0], *extra(0), **kw).float()
                row[tag] = time_calls([lambda i=i: fn(xk, ws[i], *extra(i), **kw) for i in range(len(ws))])
            except Exception as e:   # a shape Triton cannot compile: noted, not fatal
                log(f"{name} {tag}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            row[tag + " err"] = ((y - ref).norm() / ref.norm()).item()
        table[name] = row
        log(f"gemv {name:8s} " + " ".join(f"{key}={v:.4g}" for key, v in row.items()))
        del ws
        torch.cuda.empty_cache()
    return table


ONLY = shapes_wanted()
PIPE = "--pipe" in sys.argv


def main() -> None:
    if "--read" in sys.argv:
        read_table()
    table = gemv_table()
    log("\nus per call (CUDA graph, L2 overflowed): shipped GEMV vs the best pipelined variants")
    kinds = {"v2": lambda k: k.startswith("v2") and "shift-free" not in k,
             "shift-free": lambda k: "shift-free" in k, "pipe": lambda k: k.startswith("pipe"),
             "tma": lambda k: k.startswith("tma")}
    total = dict.fromkeys(["shipped", *kinds], 0.0)
    for name, row in table.items():
        line = f"{name:8s} shipped {row['shipped']:7.2f}"
        total["shipped"] += row["shipped"]
        for kind, wanted in kinds.items():
            keys = [key for key in row if wanted(key) and not key.endswith("err")]
            if keys:
                best = min(keys, key=row.get)
                total[kind] += row[best]
                line += f"  {kind} {row[best]:7.2f} ({best}, err {row[best + ' err']:.1e})"
        log(line)
    log(f"{'+'.join(table)}: " + "  ".join(f"{k} {v:.2f} us" for k, v in total.items()))


if __name__ == "__main__":
    main()
